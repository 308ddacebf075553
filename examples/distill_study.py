"""`distill_shapes.py --study`: which parts of the distillation loss help, over seeds.

Per seed, the teacher of the example is trained once; then the student is trained from the
same initialisation and data order under every selected loss variant (and student width),
with the example's own `train_stage`, and scored by mAP@0.5 on the validation split. Over the
seeds, each variant gets the mean ± standard deviation of its mAP and of its difference from
the baseline (paired by seed: the baseline trained from the same initialisation).

Every finished run is kept in `--out` (`runs/seed<S>/teacher.pt` and `teacher.json`,
`runs/seed<S>/w<width>/<variant>.json`), so an interrupted study continues where it stopped
when the same command is run again; runs already there are not trained again. After every
run, `study.json` (every run's settings and figures, and the summary), `study.md` (the table,
sorted by the difference from the baseline) and `study.png` (mAP per variant, a point per
seed and the mean; below it, each run's difference from its seed's baseline) are rewritten
from all the runs in `--out`.

    python examples/distill_shapes.py --study --out runs/study --threads 1
    python examples/distill_shapes.py --study --variants baseline,recipe --seeds 0-4 --widths 6,3
    python examples/distill_shapes.py --list-variants
"""

import argparse
import glob
import json
import math
import os
import sys
import textwrap
import time

import torch
from tqdm import tqdm

import distill_shapes as shapes

# The seed recipe: 0.3·soft + 0.7·conf + 0.5·l2 + loc, T = 2, class-weighted soft term (neg_w 1.5).
RECIPE = dict(kd=True, soft=0.3, conf=0.7, l2=0.5, loc=1.0, T=2.0, neg_w=1.5)


def _from_recipe(about, **changes):
    variant = dict(RECIPE, about=about)
    variant.update(changes)
    return variant


# The grid. Axes of the issue that coincide with another variant are run once: μ = 0.7, T = 2
# and neg_w = 1.5 are the recipe; μ = 1.0 (μ·conf + (1−μ)·soft with the recipe's l2 and loc)
# is "l2-only".
VARIANTS = {
    "baseline": dict(kd=False, about="no teacher: conf + loc (MultiBoxLoss)"),
    "recipe": _from_recipe("the seed recipe (= mu 0.7, T 2, class-weighted)"),
    "soft-only": _from_recipe("the recipe without the l2 term", l2=0.0),
    "l2-only": _from_recipe("the recipe without the soft term, its weight back on conf (= mu 1.0)",
                            soft=0.0, conf=1.0),
    "plain-kl": _from_recipe("the recipe with plain KL (neg_w 1) instead of the class-weighted form",
                             neg_w=1.0),
    "T1": _from_recipe("the recipe at T = 1", T=1.0),
    "T4": _from_recipe("the recipe at T = 4", T=4.0),
    "mu0.5": _from_recipe("mu 0.5: 0.5·conf + 0.5·soft, with the recipe's l2 and loc", soft=0.5, conf=0.5),
}

# What must be equal for runs to be compared (kept in `study_config.json` of `--out`).
CONFIG_KEYS = ("train_images", "val_images", "epochs", "batch", "lr", "backend")

# Two-sided 95 % quantiles of Student's t for 1..10 degrees of freedom.
T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


class StudyError(Exception):
    """A problem with the options or with what `--out` holds, said in one sentence."""


def formula(variant):
    if not variant["kd"]:
        return "conf + loc"
    parts = []
    for key in ("soft", "conf", "l2", "loc"):
        w = variant[key]
        if w:
            parts.append(key if w == 1.0 else f"{w:g}·{key}")
    text = " + ".join(parts)
    if variant["soft"]:
        text += f", T {variant['T']:g}, " + ("plain KL" if variant["neg_w"] == 1.0 else f"neg_w {variant['neg_w']:g}")
    return text


def settings_of(variant):
    """A variant's settings as stored with its runs (what makes two runs comparable)."""
    return {k: v for k, v in variant.items() if k != "about"}


# --------------------------------------------------------------------------- options


def _parse_list(text, what, convert):
    items = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if what == "seeds" and "-" in part[1:]:
                lo, hi = part.split("-", 1)
                items.extend(range(int(lo), int(hi) + 1))
            else:
                items.append(convert(part))
        except (TypeError, ValueError):
            raise StudyError(f"--{what}: cannot read {part!r}") from None
    if not items:
        raise StudyError(f"--{what} names nothing")
    return list(dict.fromkeys(items))


def selection(args):
    """(variants, seeds, widths) picked by the options, checked."""
    if args.variants.strip() == "all":
        variants = list(VARIANTS)
    else:
        variants = _parse_list(args.variants, "variants", str)
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise StudyError(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = _parse_list(args.seeds, "seeds", int)
    if any(s < 0 for s in seeds):
        raise StudyError("--seeds must be 0 or more")
    widths = _parse_list(args.widths, "widths", int)
    if any(w < 1 for w in widths):
        raise StudyError("--widths must be 1 or more")
    return variants, seeds, widths


# --------------------------------------------------------------------------- files


def _write_atomic(path, write):
    """`write(file)` to a temporary file beside `path`, then renamed over it: an interrupted
    study never leaves half a result behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    binary = path.endswith((".pt", ".png"))
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
    os.replace(tmp, path)


def _write_json(path, data):
    _write_atomic(path, lambda f: json.dump(data, f, indent=1, allow_nan=False))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def check_config(out, args):
    """The settings of this call against those `out` was started with (written on first use)."""
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    config.update(teacher_width=shapes.TEACHER_WIDTH, prior_config=shapes.PRIOR_CONFIG)
    config = json.loads(json.dumps(config))  # tuples → lists, as read back
    path = os.path.join(out, "study_config.json")
    if os.path.exists(path):
        kept = _read_json(path)
        differ = [f"{k} {kept.get(k)!r} there, {config[k]!r} now" for k in config if kept.get(k) != config[k]]
        if differ:
            raise StudyError(f"{out} holds a study with other settings ({'; '.join(differ)}): "
                             "run with the same settings to continue it, or pick another --out")
    else:
        _write_json(path, config)
    return config


def run_path(out, seed, width, name):
    return os.path.join(out, "runs", f"seed{seed}", f"w{width}", f"{name}.json")


def teacher_paths(out, seed):
    folder = os.path.join(out, "runs", f"seed{seed}")
    return os.path.join(folder, "teacher.pt"), os.path.join(folder, "teacher.json")


def kept_run(out, seed, width, name):
    """The stored result of a run, or None; refuses a run stored with other settings."""
    path = run_path(out, seed, width, name)
    if not os.path.exists(path):
        return None
    result = _read_json(path)
    if result.get("settings") != settings_of(VARIANTS[name]):
        raise StudyError(f"{path} was trained with other settings for {name!r} ({result.get('settings')}): "
                         "delete it to train it again, or pick another --out")
    return result


# --------------------------------------------------------------------------- training


def _seed_args(args, seed):
    return argparse.Namespace(**{**vars(args), "seed": seed})


def train_teacher(args, seed, data, priors, device, bar):
    model_path, info_path = teacher_paths(args.out, seed)
    teacher = shapes.make_teacher(seed, device)
    if os.path.exists(model_path) and os.path.exists(info_path):
        teacher.load_state_dict(torch.load(model_path, map_location=device))
        return shapes.freeze(teacher), _read_json(info_path)
    bar.set_description(f"seed {seed} teacher")
    start = time.perf_counter()
    records = shapes.train_stage("plain", "", teacher, *data, priors, shapes.make_plain_loss(args.backend),
                                 _seed_args(args, seed), quiet=True, on_epoch=lambda: bar.update(1))
    info = dict(seed=seed, width=shapes.TEACHER_WIDTH, parameters=shapes.count_parameters(teacher),
                map50=shapes.mean_ap(teacher, data[1], priors, args.batch), records=records)
    info["time_s"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(model_path), exist_ok=True)
    _write_atomic(model_path, lambda f: torch.save(teacher.state_dict(), f))
    _write_json(info_path, info)
    bar.write(f"seed {seed} teacher: mAP@0.5 {info['map50']:.3f} ({info['time_s']:.0f} s)")
    return shapes.freeze(teacher), info


def train_student(args, seed, width, name, data, priors, device, teacher, teacher_info, bar):
    variant = VARIANTS[name]
    bar.set_description(f"seed {seed} w{width} {name}")
    student = shapes.make_student(seed, device, width)
    seed_args = _seed_args(args, seed)
    tick = lambda: bar.update(1)  # noqa: E731
    start = time.perf_counter()
    if variant["kd"]:
        weights = dict(soft_loss=variant["soft"], loss_c=variant["conf"], l2_loss=variant["l2"],
                       loss_l=variant["loc"])
        loss = shapes.make_kd_loss(args.backend, variant["T"], variant["neg_w"])
        records = shapes.train_stage("kd", "", student, *data, priors, loss, seed_args, teacher, weights,
                                     quiet=True, on_epoch=tick)
    else:
        records = shapes.train_stage("plain", "", student, *data, priors, shapes.make_plain_loss(args.backend),
                                     seed_args, quiet=True, on_epoch=tick)
    result = dict(seed=seed, width=width, variant=name, settings=settings_of(variant), formula=formula(variant),
                  parameters=shapes.count_parameters(student),
                  map50=shapes.mean_ap(student, data[1], priors, args.batch),
                  teacher_map50=teacher_info["map50"], records=records)
    result["time_s"] = time.perf_counter() - start
    path = run_path(args.out, seed, width, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_json(path, result)
    base = kept_run(args.out, seed, width, "baseline")
    versus = f", {result['map50'] - base['map50']:+.3f} against the baseline" if base and name != "baseline" else ""
    bar.write(f"seed {seed} width {width} {name}: mAP@0.5 {result['map50']:.3f}{versus} ({result['time_s']:.0f} s)")
    return result


# --------------------------------------------------------------------------- summary


def _mean_sd(values):
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, sd


def _t95(df):
    return T_95[df - 1] if df <= len(T_95) else 1.96 + 2.4 / df


def collect(out):
    """Every run and teacher kept in `out` (whatever this call selected)."""
    runs, teachers = [], {}
    for path in sorted(glob.glob(os.path.join(out, "runs", "seed*", "w*", "*.json"))):
        run = _read_json(path)
        if run.get("variant") in VARIANTS:
            runs.append(run)
    for path in sorted(glob.glob(os.path.join(out, "runs", "seed*", "teacher.json"))):
        info = _read_json(path)
        teachers[info["seed"]] = info
    return runs, teachers


def summarise(runs, teachers):
    """One row per (width, variant): mAP over the seeds and the difference from the baseline
    of the same seed and width, sorted by that difference within each width (widest first)."""
    by_key = {}
    for run in runs:
        by_key.setdefault((run["width"], run["variant"]), {})[run["seed"]] = run["map50"]
    rows = []
    for (width, name), maps in by_key.items():
        base = by_key.get((width, "baseline"), {})
        seeds = sorted(maps)
        mean, sd = _mean_sd([maps[s] for s in seeds])
        paired = sorted(s for s in seeds if s in base)
        diffs = [maps[s] - base[s] for s in paired]
        d_mean, d_sd = _mean_sd(diffs)
        ci = _t95(len(diffs) - 1) * d_sd / math.sqrt(len(diffs)) if d_sd is not None else None
        params = next(r["parameters"] for r in runs if r["width"] == width and r["variant"] == name)
        rows.append(dict(
            variant=name, width=width, parameters=params, formula=formula(VARIANTS[name]),
            about=VARIANTS[name]["about"], seeds=seeds, map50=[maps[s] for s in seeds],
            map50_mean=mean, map50_sd=sd,
            paired_seeds=paired, diff=diffs, diff_mean=d_mean, diff_sd=d_sd, diff_ci95=ci,
            diff_min=min(diffs) if diffs else None, diff_max=max(diffs) if diffs else None,
            wins=sum(d > 0 for d in diffs),
        ))
    rows.sort(key=lambda r: (-r["width"], -(r["diff_mean"] if r["diff_mean"] is not None else -math.inf),
                             r["variant"]))
    t_maps = [t["map50"] for _, t in sorted(teachers.items())]
    t_mean, t_sd = _mean_sd(t_maps)
    teacher = dict(seeds=sorted(teachers), map50=t_maps, map50_mean=t_mean, map50_sd=t_sd,
                   parameters=next(iter(teachers.values()))["parameters"] if teachers else None)
    return rows, teacher


def _pm(mean, sd, signed=False):
    if mean is None:
        return "–"
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + (f" ± {sd:.3f}" if sd is not None else "")


def verdict(rows):
    """One sentence per width: the best distillation variant against the baseline."""
    lines = []
    for width in sorted({r["width"] for r in rows}, reverse=True):
        kd = [r for r in rows if r["width"] == width and r["variant"] != "baseline" and r["diff_mean"] is not None]
        if not kd:
            continue
        best = max(kd, key=lambda r: r["diff_mean"])
        n = len(best["diff"])
        if best["diff_mean"] > 0 and best["diff_ci95"] is not None and best["diff_mean"] - best["diff_ci95"] > 0:
            how = "beats the baseline beyond the seed-to-seed spread (the 95 % interval of the paired difference excludes 0)"
        elif best["diff_mean"] > 0 and n < 2:
            how = "is above the baseline in its only paired seed (one seed: no spread to judge it by)"
        elif best["diff_mean"] > 0:
            how = "is above the baseline on average, but not beyond the seed-to-seed spread"
        else:
            how = "comes closest; no distillation variant beats the baseline on average"
        lines.append(f"width {width}: {best['variant']} ({best['formula']}) {how}: "
                     f"{_pm(best['diff_mean'], best['diff_sd'], True)} mAP over {n} seed(s), "
                     f"above the baseline in {best['wins']} of {n}.")
    return lines


def write_markdown(path, rows, teacher, config):
    lines = [
        f"Teacher (width {config['teacher_width']}, {teacher['parameters'] or 0:,} parameters): mAP@0.5 "
        f"{_pm(teacher['map50_mean'], teacher['map50_sd'])} over {len(teacher['seeds'])} seed(s). "
        f"{config['train_images']} training and {config['val_images']} validation images, "
        f"{config['epochs']} epochs per run. Δ = the variant's mAP minus the baseline's of the same seed and "
        "student; ± is the standard deviation over the seeds, the interval the 95 % t-interval of the mean Δ.",
        "",
        "| variant | loss | width (parameters) | seeds | mAP@0.5 | Δ vs baseline | Δ 95 % interval | Δ per seed, min … max "
        "| above baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = (f"{r['diff_mean'] - r['diff_ci95']:+.3f} … {r['diff_mean'] + r['diff_ci95']:+.3f}"
              if r["diff_ci95"] is not None and r["variant"] != "baseline" else "–")
        spread = (f"{r['diff_min']:+.3f} … {r['diff_max']:+.3f}"
                  if r["diff"] and r["variant"] != "baseline" else "–")
        wins = f"{r['wins']}/{len(r['diff'])}" if r["diff"] and r["variant"] != "baseline" else "–"
        diff = _pm(r["diff_mean"], r["diff_sd"], True) if r["variant"] != "baseline" else "0 (reference)"
        lines.append(f"| {r['variant']} | {r['formula']} | {r['width']} ({r['parameters']:,}) | {len(r['seeds'])} "
                     f"| {_pm(r['map50_mean'], r['map50_sd'])} | {diff} | {ci} | {spread} | {wins} |")
    lines += [""]
    for line in verdict(rows):
        lines += textwrap.wrap(line, 92) + [""]
    lines[0:1] = textwrap.wrap(lines[0], 92)
    _write_atomic(path, lambda f: f.write("\n".join(lines) + "\n"))


def plot(path, rows, teacher):
    """Top: mAP per variant, a point per seed and the mean (bar); bottom: the same runs' difference
    from the baseline of their seed, which removes the seed-to-seed spread they share. One
    column per student width; variants in the table's order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in rows}, reverse=True)
    panels = [[r for r in rows if r["width"] == w] for w in widths]
    seeds = sorted({s for r in rows for s in r["seeds"]})
    colour = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    fig, axes = plt.subplots(2, len(panels), squeeze=False, sharex="col", height_ratios=(3, 2),
                             width_ratios=[max(len(p), 2) for p in panels],
                             figsize=(max(4.5, 0.8 * sum(max(len(p), 2) for p in panels) + 1.5 * len(panels)), 6.4))
    for col, (panel, width) in enumerate(zip(panels, widths)):
        top, bottom = axes[0][col], axes[1][col]
        for x, r in enumerate(panel):
            spread = lambda i, n: x + (i - (n - 1) / 2) * 0.08  # noqa: E731
            for i, (s, m) in enumerate(zip(r["seeds"], r["map50"])):
                top.plot(spread(i, len(r["seeds"])), m, "o", ms=5, color=colour[s], alpha=0.8, label=f"seed {s}")
            top.plot([x - 0.3, x + 0.3], [r["map50_mean"]] * 2, "-", color="black", lw=2, label="mean")
            if r["variant"] != "baseline" and r["diff"]:
                for i, (s, d) in enumerate(zip(r["paired_seeds"], r["diff"])):
                    bottom.plot(spread(i, len(r["diff"])), d, "o", ms=5, color=colour[s], alpha=0.8)
                bottom.plot([x - 0.3, x + 0.3], [r["diff_mean"]] * 2, "-", color="black", lw=2)
        base = next((r for r in panel if r["variant"] == "baseline"), None)
        if base is not None:
            top.axhline(base["map50_mean"], ls="--", color="grey", lw=1, label="baseline mean")
        bottom.axhline(0.0, ls="--", color="grey", lw=1)
        top.set_title(f"student width {width} ({panel[0]['parameters']:,} parameters)", fontsize=10)
        bottom.set_xticks(range(len(panel)))
        bottom.set_xticklabels([r["variant"] for r in panel], rotation=35, ha="right")
        for ax in (top, bottom):
            ax.grid(axis="y", alpha=0.3)
        handles, labels = top.get_legend_handles_labels()
        unique = dict(zip(labels, handles))  # one entry per seed
        top.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    axes[0][0].set_ylabel("mAP@0.5 (validation)")
    axes[1][0].set_ylabel("minus the baseline\nof the same seed")
    if teacher["map50_mean"] is not None:
        fig.suptitle(f"students by loss variant, best first (teacher: mAP {teacher['map50_mean']:.3f}, mean)",
                     fontsize=10)
    fig.tight_layout()
    _write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def write_outputs(args, config, command, elapsed):
    runs, teachers = collect(args.out)
    if not runs:
        return None
    rows, teacher = summarise(runs, teachers)
    study = dict(
        command=command, config=config, variants={k: dict(v, formula=formula(v)) for k, v in VARIANTS.items()},
        teacher=teacher, summary=rows, verdict=verdict(rows),
        runs=[{k: v for k, v in r.items() if k != "records"} for r in runs],
        teachers=[{k: v for k, v in t.items() if k != "records"} for _, t in sorted(teachers.items())],
        train_s_total=sum(r["time_s"] for r in runs) + sum(t["time_s"] for t in teachers.values()),
        this_call_s=elapsed,
    )
    _write_json(os.path.join(args.out, "study.json"), study)
    write_markdown(os.path.join(args.out, "study.md"), rows, teacher, config)
    plot(os.path.join(args.out, "study.png"), rows, teacher)
    return study


# --------------------------------------------------------------------------- main


def list_variants():
    print(f"{'variant':<10} {'loss':<52} about")
    for name, v in VARIANTS.items():
        print(f"{name:<10} {formula(v):<52} {v['about']}")


def run(args, argv=None):
    try:
        return _run(args, argv)
    except StudyError as e:
        print(f"distill_shapes.py --study: {e}", file=sys.stderr)
        sys.exit(2)


def _run(args, argv):
    if args.list_variants:
        list_variants()
        return None
    started = time.perf_counter()
    command = [sys.executable] + sys.argv if argv is None else ["distill_shapes.py"] + list(argv)
    variants, seeds, widths = selection(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.makedirs(args.out, exist_ok=True)
    config = check_config(args.out, args)
    device = torch.device(args.device)

    todo = {s: [(w, v) for w in widths for v in variants if kept_run(args.out, s, w, v) is None] for s in seeds}
    need_teacher = {s for s, runs in todo.items() if runs and not os.path.exists(teacher_paths(args.out, s)[1])}
    pending = sum(len(r) for r in todo.values())
    total = len(seeds) * len(widths) * len(variants)
    print(f"study in {args.out}: {len(variants)} variant(s) × {len(seeds)} seed(s) × {len(widths)} width(s) = "
          f"{total} runs, {total - pending} kept from before, {pending} to train "
          f"(and {len(need_teacher)} teacher(s)); {args.epochs} epochs each", flush=True)

    bar = tqdm(total=(pending + len(need_teacher)) * args.epochs, unit="epoch", dynamic_ncols=True,
               desc="study", mininterval=1.0, smoothing=0.05)
    try:
        for seed in seeds:
            if not todo[seed]:
                continue
            data = shapes.make_data(args, seed)
            priors = shapes.make_priors(device)
            teacher, teacher_info = train_teacher(args, seed, data, priors, device, bar)
            for width, name in todo[seed]:
                train_student(args, seed, width, name, data, priors, device, teacher, teacher_info, bar)
                write_outputs(args, config, command, time.perf_counter() - started)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: the finished runs are kept in {args.out}; the same command continues the study",
              file=sys.stderr)
        sys.exit(130)
    bar.close()
    study = write_outputs(args, config, command, time.perf_counter() - started)
    if study is None:
        raise StudyError(f"no runs in {args.out}")
    with open(os.path.join(args.out, "study.md")) as f:
        print("\n" + f.read(), end="")
    print(f"wrote study.json, study.md and study.png to {args.out} "
          f"({time.perf_counter() - started:.0f} s in this call)")
    return study
