//! Killed writes leave nothing behind (SPEC §9.6, README "Files and limits"): `ssdkd eval
//! --grad-out` is killed with `SIGKILL` and interrupted with `SIGINT` at 20 seeded random
//! moments inside its write. After each, the target is the old file or the new one, whole,
//! and no other file is in its folder; after `SIGINT` the exit code is 130 and stderr is
//! one line.
//!
//! "Inside the write" is found from outside: the moment the child holds a file open in the
//! output folder (`/proc/PID/fd`, which shows an unnamed `O_TMPFILE` file too) starts the
//! write; a first, undisturbed run measures how long it lasts until the child exits.

#![cfg(target_os = "linux")]

use ssdkd::demo::{synthetic_batch, SyntheticSpec};
use ssdkd::io::file::write_batch_file;
use ssdkd::{LossConfig, OwnedBatch, PriorPreset};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Moments per signal.
const MOMENTS: usize = 20;
/// The most moments drawn to find `MOMENTS` inside the write.
const MOST_ATTEMPTS: usize = 3 * MOMENTS;
/// The line `ssdkd` prints after Ctrl-C (bin/ssdkd/interrupt.rs).
const INTERRUPTED: &str = "ssdkd: interrupted; any output file is as it was or completely written";

/// SplitMix64, for the seeded moments.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A batch without teacher whose gradients are 40 × 8732 × (21 + 4) f32, 35 MB: a write
/// long enough to be hit, an evaluation short enough for 41 runs on two cores.
fn input_batch(path: &Path) {
    let owned = synthetic_batch(&SyntheticSpec::bench(40, 21, PriorPreset::Ssd300));
    let shape = owned.shape();
    let [student_loc, student_conf, _, _, targets, priors] = owned.into_tensors();
    let owned =
        OwnedBatch::without_teacher(shape, student_loc, student_conf, targets, priors).unwrap();
    write_batch_file(path, &owned, &LossConfig::DEFAULT).unwrap();
}

/// Whether `pid` holds a file open inside `folder` (not the folder itself).
fn writing_in(pid: u32, folder: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|to| to.starts_with(folder) && to != folder)
    })
}

/// Waits until `child` starts writing in `folder`; panics if it ends or takes 60 s first.
fn wait_for_write(child: &mut Child, folder: &Path) -> Instant {
    let start = Instant::now();
    loop {
        if writing_in(child.id(), folder) {
            return Instant::now();
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "ssdkd ended ({status}) before it wrote in {}",
                folder.display()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ssdkd did not start writing within 60 s"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The writer: `ssdkd eval INPUT --backend cpu --grad-out TARGET`.
fn spawn_eval(input: &Path, target: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ssdkd"))
        .arg("eval")
        .arg(input)
        .args(["--backend", "cpu", "--grad-out"])
        .arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssdkd runs")
}

fn finish(mut child: Child) -> (ExitStatus, String) {
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .unwrap();
    (child.wait().unwrap(), stderr)
}

/// The names in `folder`, sorted.
fn names(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

struct Setup {
    _dir: tempfile::TempDir,
    input: PathBuf,
    out: PathBuf,
    target: PathBuf,
    old: Vec<u8>,
    new: Vec<u8>,
    /// From the start of the write to the end of the process, undisturbed.
    window: Duration,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("batch.safetensors");
    input_batch(&input);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let target = out.join("grads.safetensors");
    // The old file: a whole safetensors file of other gradients.
    ssdkd::io::output::write_f32_tensors(
        &target,
        &[],
        &[("grad_student_conf", vec![2], &[0.5, -0.25])],
        None,
    )
    .unwrap();
    let old = std::fs::read(&target).unwrap();
    let mut child = spawn_eval(&input, &target);
    let started = wait_for_write(&mut child, &out);
    let (status, stderr) = finish(child);
    let window = started.elapsed();
    assert!(status.success(), "{status}: {stderr}");
    let new = std::fs::read(&target).unwrap();
    let st = safetensors::SafeTensors::deserialize(&new).unwrap();
    assert_eq!(
        st.tensor("grad_student_conf").unwrap().shape(),
        &[40, 8732, 21]
    );
    assert_eq!(
        st.tensor("grad_student_loc").unwrap().shape(),
        &[40, 8732, 4]
    );
    assert_ne!(old, new);
    eprintln!(
        "write window {:.0} ms for {} MB",
        window.as_secs_f64() * 1e3,
        new.len() / 1_000_000
    );
    Setup {
        _dir: dir,
        input,
        out,
        target,
        old,
        new,
        window,
    }
}

/// Kills or interrupts the writer at `MOMENTS` seeded moments inside its write and checks
/// what is left each time; `check_exit` judges the child's end. A moment that comes after
/// the child has finished does not count (the files are checked all the same) and bounds
/// the moments drawn after it.
fn interrupt_writes(signal: libc::c_int, seed: u64, check_exit: impl Fn(ExitStatus, &str)) {
    // One test at a time: the timing of the moments assumes the machine is not shared.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let s = setup();
    let mut rng = Rng(seed);
    let mut window = s.window;
    let (mut hit, mut old_left) = (0, 0);
    for attempt in 0..MOST_ATTEMPTS {
        if hit == MOMENTS {
            break;
        }
        std::fs::write(&s.target, &s.old).unwrap();
        assert_eq!(names(&s.out), ["grads.safetensors"]);
        let delay = window.mul_f64(rng.unit());
        let mut child = spawn_eval(&s.input, &s.target);
        let started = wait_for_write(&mut child, &s.out);
        std::thread::sleep(delay.saturating_sub(started.elapsed()));
        // SAFETY: the pid is our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let (status, stderr) = finish(child);
        let what = format!("attempt {attempt} ({delay:?} into the write): {status}");
        assert_eq!(names(&s.out), ["grads.safetensors"], "{what}");
        let left = std::fs::read(&s.target).unwrap();
        assert!(left == s.old || left == s.new, "{what}: target is neither");
        if status.success() {
            // The signal came after the command had finished: the write took less than
            // `delay` this time.
            assert_eq!(left, s.new, "{what}");
            window = delay;
        } else {
            hit += 1;
            check_exit(status, &stderr);
            old_left += usize::from(left == s.old);
        }
    }
    eprintln!(
        "{hit} signals inside the write (window {:.0} ms at the end); the old file left {old_left} times",
        window.as_secs_f64() * 1e3
    );
    assert_eq!(
        hit, MOMENTS,
        "only {hit} of {MOST_ATTEMPTS} moments hit the write"
    );
}

#[test]
fn sigkill_inside_the_write_leaves_the_old_or_new_file_and_nothing_else() {
    interrupt_writes(libc::SIGKILL, 28, |status, _| {
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    });
}

#[test]
fn sigint_inside_the_write_exits_130_with_one_line_and_leaves_nothing_else() {
    interrupt_writes(libc::SIGINT, 130, |status, stderr| {
        assert_eq!(status.code(), Some(130), "{status}: {stderr}");
        assert_eq!(stderr, format!("{INTERRUPTED}\n"));
    });
}
