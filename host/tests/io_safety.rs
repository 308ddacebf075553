//! Files that cannot be destroyed and inputs that cannot hang or exhaust memory (SPEC §8.2,
//! §8.4, §9.6): output targets that are special files or inputs are
//! refused, outputs are replaced atomically, honour the umask and keep symbolic links;
//! special, sparse and truncated inputs are refused at once; repeated JSON keys are errors.

#![cfg(unix)]

use ssdkd::io::file::{BatchFile, ConfigOverrides};
use ssdkd::Error;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/voc_default_b4.safetensors")
}

/// Little-endian f32 values of a tensor's bytes.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(status.success());
}

/// A character device node (/dev/null's numbers) in `dir`; `None` (with a message) when not
/// root.
fn char_device(dir: &Path) -> Option<PathBuf> {
    if !is_root() {
        eprintln!("skipped: device-node case (mknod needs root)");
        return None;
    }
    let path = dir.join("null-device");
    let status = Command::new("mknod")
        .arg(&path)
        .args(["c", "1", "3"])
        .status()
        .expect("mknod runs");
    assert!(status.success());
    Some(path)
}

/// What a child run produced, with its time and peak memory (from `wait4`).
struct Run {
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
    max_rss_kib: i64,
}

/// Runs the binary through `sh -c` (for the umask) or directly; kills it after 20 s so that
/// a hang fails the test instead of stalling it.
fn run(args: &[&str], umask: Option<&str>) -> Run {
    let bin = env!("CARGO_BIN_EXE_ssdkd");
    let mut command = match umask {
        Some(mask) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("umask {mask}; exec \"$0\" \"$@\""))
                .arg(bin)
                .args(args);
            c
        }
        None => {
            let mut c = Command::new(bin);
            c.args(args);
            c
        }
    };
    let start = Instant::now();
    // Reaped below with wait4, which also gives its peak memory.
    #[allow(clippy::zombie_processes)]
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssdkd runs");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our child; status and usage are valid for writes.
        let done = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(done >= 0, "wait4 failed");
        if done == pid {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            // SAFETY: pid is our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("ssdkd {args:?} still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.expect("piped"), &mut stderr).unwrap();
    Run {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stderr,
        elapsed,
        max_rss_kib: usage.ru_maxrss,
    }
}

fn eval_args<'a>(input: &'a str, grad_out: &'a str) -> Vec<&'a str> {
    vec!["eval", input, "--backend", "cpu", "--grad-out", grad_out]
}

// ---------------------------------------------------------------- outputs (library)

#[test]
fn special_targets_are_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let socket_path = dir.path().join("socket");
    let _socket = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    let mut targets = vec![
        (fifo, "a FIFO"),
        (socket_path, "a socket"),
        (folder, "a directory"),
    ];
    if let Some(device) = char_device(dir.path()) {
        targets.push((device, "a character device"));
    }
    for (target, kind) in &targets {
        let before = std::fs::symlink_metadata(target).unwrap().file_type();
        let err =
            ssdkd::io::output::write_file(target, &[], |out| out.write_all(b"x")).unwrap_err();
        assert!(matches!(err, Error::File { .. }), "{err}");
        assert!(err.to_string().contains(kind), "{err}");
        let after = std::fs::symlink_metadata(target).unwrap().file_type();
        assert_eq!(before, after, "{} changed type", target.display());
    }
    // Nothing else was left in the folder (no temporary files).
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), targets.len());
}

#[test]
fn a_target_that_is_an_input_is_refused_directly_via_symlink_and_hard_link() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("batch.safetensors");
    std::fs::write(&input, b"the batch").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("batch.safetensors", &link).unwrap();
    let hard = dir.path().join("hard");
    std::fs::hard_link(&input, &hard).unwrap();
    for target in [&input, &link, &hard] {
        let err = ssdkd::io::output::write_file(target, &[&input], |out| out.write_all(b"grads"))
            .unwrap_err();
        assert!(err.to_string().contains("same file as the input"), "{err}");
        // And the other way round: the input named through the link.
        let err = ssdkd::io::output::write_file(&input, &[target], |out| out.write_all(b"grads"))
            .unwrap_err();
        assert!(err.to_string().contains("same file as the input"), "{err}");
    }
    assert_eq!(std::fs::read(&input).unwrap(), b"the batch");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_failed_write_leaves_the_old_file_and_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("grads.safetensors");
    std::fs::write(&target, b"old gradients").unwrap();
    let err = ssdkd::io::output::write_file(&target, &[], |out| {
        out.write_all(b"half of the new")?;
        Err(std::io::Error::other("disk on fire"))
    })
    .unwrap_err();
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"old gradients");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("grads.safetensors")]);
    // A successful write replaces it.
    ssdkd::io::output::write_file(&target, &[], |out| out.write_all(b"new")).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"new");
}

#[test]
fn symlinked_outputs_replace_the_file_they_point_to_and_keep_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.safetensors");
    std::fs::write(&real, b"old").unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink("real.safetensors", &link).unwrap();
    ssdkd::io::output::write_file(&link, &[], |out| out.write_all(b"new")).unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&real).unwrap(), b"new");
    // A dangling link: the file it names is created, the link stays.
    let dangling = dir.path().join("dangling");
    std::os::unix::fs::symlink("created.safetensors", &dangling).unwrap();
    ssdkd::io::output::write_file(&dangling, &[], |out| out.write_all(b"made")).unwrap();
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read(dir.path().join("created.safetensors")).unwrap(),
        b"made"
    );
    // A link to a FIFO is refused like the FIFO.
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let to_fifo = dir.path().join("to-fifo");
    std::os::unix::fs::symlink(&fifo, &to_fifo).unwrap();
    let err = ssdkd::io::output::write_file(&to_fifo, &[], |out| out.write_all(b"x")).unwrap_err();
    assert!(err.to_string().contains("a FIFO"), "{err}");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn written_tensors_read_back_with_the_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let a = [1.0f32, -2.5, 3.25, 0.0, 7.0, 8.5];
    let b = [0.125f32];
    let metadata = [("note".to_owned(), "x".to_owned())].into();
    ssdkd::io::output::write_f32_tensors(
        &path,
        &[],
        &[("a", vec![2, 3], &a), ("b", vec![1], &b)],
        Some(metadata),
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a_back: Vec<f32> = f32s(st.tensor("a").unwrap().data());
    assert_eq!(a_back, a);
    assert_eq!(st.tensor("a").unwrap().shape(), &[2, 3]);
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header.metadata().as_ref().unwrap()["note"], "x");
    // A shape that disagrees with the data is an error naming the tensor, nothing written.
    let err =
        ssdkd::io::output::write_f32_tensors(&path, &[], &[("c", vec![4], &b)], None).unwrap_err();
    assert!(
        err.to_string()
            .contains("c: shape [4] holds 4 values, 1 given"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

// ---------------------------------------------------------------- outputs (binary)

#[test]
fn grad_out_naming_the_input_is_refused_and_the_input_kept() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("batch.safetensors");
    std::fs::copy(golden(), &input).unwrap();
    let original = std::fs::read(&input).unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let hard = dir.path().join("hard.safetensors");
    std::fs::hard_link(&input, &hard).unwrap();
    for (given, target) in [
        (&input, &input),
        (&input, &link),
        (&input, &hard),
        (&link, &hard),
    ] {
        let run = run(
            &eval_args(given.to_str().unwrap(), target.to_str().unwrap()),
            None,
        );
        assert_eq!(run.code, Some(2), "{}", run.stderr);
        assert!(
            run.stderr.contains("same file as the input"),
            "{}",
            run.stderr
        );
    }
    assert_eq!(std::fs::read(&input).unwrap(), original);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn grad_out_dev_full_stays_a_device() {
    let run = run(&eval_args(golden().to_str().unwrap(), "/dev/full"), None);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("a character device"), "{}", run.stderr);
    assert!(std::fs::metadata("/dev/full")
        .unwrap()
        .file_type()
        .is_char_device());
}

#[test]
fn grad_out_fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let run = run(
        &eval_args(golden().to_str().unwrap(), fifo.to_str().unwrap()),
        None,
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("a FIFO"), "{}", run.stderr);
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn a_failed_eval_leaves_an_old_grad_out_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grads.safetensors");
    std::fs::write(&out, b"old gradients").unwrap();
    // num_classes disagrees with the tensors: refused after the output check.
    let run = run(
        &[
            "eval",
            golden().to_str().unwrap(),
            "--backend",
            "cpu",
            "--num-classes",
            "5",
            "--grad-out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), b"old gradients");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn outputs_honour_the_umask_keep_modes_and_links() {
    let dir = tempfile::tempdir().unwrap();
    let input = golden();
    let input = input.to_str().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for (umask, expected) in [("022", 0o644), ("077", 0o600), ("002", 0o664)] {
        let out = dir.path().join(format!("grads-{umask}.safetensors"));
        let run = run(&eval_args(input, out.to_str().unwrap()), Some(umask));
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        assert_eq!(mode(&out), expected, "umask {umask}");
    }
    // `priors --out` too.
    let priors = dir.path().join("priors.safetensors");
    let run1 = run(
        &[
            "priors",
            "--preset",
            "ssd300",
            "--out",
            priors.to_str().unwrap(),
        ],
        Some("022"),
    );
    assert_eq!(run1.code, Some(0), "{}", run1.stderr);
    assert_eq!(mode(&priors), 0o644);
    // A replaced file keeps its permission bits.
    let kept = dir.path().join("kept.safetensors");
    std::fs::write(&kept, b"old").unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o640)).unwrap();
    let run2 = run(&eval_args(input, kept.to_str().unwrap()), Some("022"));
    assert_eq!(run2.code, Some(0), "{}", run2.stderr);
    assert_eq!(mode(&kept), 0o640);
    assert_ne!(std::fs::read(&kept).unwrap(), b"old");
    // A symlinked --grad-out: the link stays, the file it points to holds the gradients.
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink("kept.safetensors", &link).unwrap();
    std::fs::write(&kept, b"old").unwrap();
    let run3 = run(&eval_args(input, link.to_str().unwrap()), Some("022"));
    assert_eq!(run3.code, Some(0), "{}", run3.stderr);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let bytes = std::fs::read(&kept).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("grad_student_conf").unwrap().shape(),
        &[4, 8732, 21]
    );
}

// ---------------------------------------------------------------- bounded reading

/// `eval` on `path` exits 2 within a second and under 100 MB, naming the problem.
fn refused_quickly(path: &Path, expect: &str) {
    let run = run(&["eval", path.to_str().unwrap(), "--backend", "cpu"], None);
    assert_eq!(run.code, Some(2), "{}: {}", path.display(), run.stderr);
    assert!(
        run.stderr.contains(expect),
        "{}: {}",
        path.display(),
        run.stderr
    );
    assert!(
        run.elapsed < Duration::from_secs(1),
        "{}: {:?}",
        path.display(),
        run.elapsed
    );
    assert!(
        run.max_rss_kib < 100 * 1024,
        "{}: {} KiB",
        path.display(),
        run.max_rss_kib
    );
}

#[test]
fn special_inputs_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    refused_quickly(&fifo, "is a FIFO, not a regular file");
    refused_quickly(
        Path::new("/dev/zero"),
        "is a character device, not a regular file",
    );
    refused_quickly(dir.path(), "is a directory, not a regular file");
    if let Some(device) = char_device(dir.path()) {
        refused_quickly(&device, "is a character device");
    }
    // The library says the same.
    let err = BatchFile::read(&fifo, &ConfigOverrides::default()).unwrap_err();
    assert!(err.to_string().contains("a FIFO"), "{err}");
}

#[test]
fn sparse_and_truncated_multi_gigabyte_inputs_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    // 4 GB of zeros (sparse): a zero header length.
    let sparse = dir.path().join("sparse.safetensors");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    refused_quickly(&sparse, "header length 0 bytes");
    // A valid header declaring 3.6 GB of tensors in a file cut at 2 GB (sparse).
    let (b, p, c) = (2048usize, 8732usize, 21usize);
    let header = serde_json::json!({
        "__metadata__": {"prior_preset": "ssd300"},
        "student_loc": {"dtype": "F32", "shape": [b, p, 4], "data_offsets": [0, b * p * 16]},
        "student_conf": {"dtype": "F32", "shape": [b, p, c],
                         "data_offsets": [b * p * 16, b * p * (16 + 4 * c)]},
        "teacher_loc": {"dtype": "F32", "shape": [b, p, 4],
                        "data_offsets": [b * p * (16 + 4 * c), b * p * (32 + 4 * c)]},
        "teacher_conf": {"dtype": "F32", "shape": [b, p, c],
                         "data_offsets": [b * p * (32 + 4 * c), b * p * (32 + 8 * c)]},
        "targets": {"dtype": "F32", "shape": [b, 1, 5],
                    "data_offsets": [b * p * (32 + 8 * c), b * p * (32 + 8 * c) + b * 20]},
    })
    .to_string();
    let truncated = dir.path().join("truncated.safetensors");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    std::fs::write(&truncated, &bytes).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    refused_quickly(&truncated, "(truncated?)");
    // A header length beyond the file, and beyond the 100 MB limit.
    let long = dir.path().join("long.safetensors");
    std::fs::write(&long, [&(1u64 << 40).to_le_bytes()[..], b"{}"].concat()).unwrap();
    refused_quickly(&long, "exceeds the limit");
    std::fs::write(&long, [&64u64.to_le_bytes()[..], b"{}"].concat()).unwrap();
    refused_quickly(&long, "does not fit a file of 10 bytes");
}

#[test]
fn eval_reads_only_the_tensors_it_needs() {
    // The golden file also holds expected_* tensors (about 4 MB) that eval never reads; its
    // result is the same from the file and from the bytes in memory.
    let from_file = BatchFile::read(&golden(), &ConfigOverrides::default()).unwrap();
    let bytes = std::fs::read(golden()).unwrap();
    let from_bytes = BatchFile::from_bytes(&bytes, &golden(), &ConfigOverrides::default()).unwrap();
    assert_eq!(from_file.tensors, from_bytes.tensors);
    assert_eq!(from_file.config, from_bytes.config);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let conf: Vec<f32> = f32s(st.tensor("student_conf").unwrap().data());
    assert_eq!(from_file.tensors.student_conf(), conf);
}

// ---------------------------------------------------------------- duplicate keys

/// The golden file with its header text changed by `edit`.
fn with_header(edit: impl Fn(&str) -> String) -> Vec<u8> {
    let bytes = std::fs::read(golden()).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = edit(std::str::from_utf8(&bytes[8..8 + n]).unwrap());
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(&bytes[8 + n..]);
    out
}

#[test]
fn duplicate_keys_are_found_where_serde_json_would_keep_the_last() {
    use ssdkd::io::input::duplicate_key;
    assert_eq!(duplicate_key(r#"{"a": 1, "b": 2}"#).unwrap(), None);
    assert_eq!(
        duplicate_key(r#"{"num_classes": 7, "num_classes": 5}"#).unwrap(),
        Some(vec!["num_classes".to_owned()])
    );
    assert_eq!(
        duplicate_key(r#"{"a": [1, {"b": {"c": 1, "c": 2}}], "d": 0}"#).unwrap(),
        Some(vec!["a".to_owned(), "b".to_owned(), "c".to_owned()])
    );
    // The same key in different objects is fine.
    assert_eq!(
        duplicate_key(r#"{"a": {"x": 1}, "b": {"x": 1}}"#).unwrap(),
        None
    );
    assert!(duplicate_key("{").is_err());

    let err =
        ConfigOverrides::from_config_json(r#"{"num_classes": 7, "num_classes": 5}"#).unwrap_err();
    match &err {
        Error::Config { key, problem } => {
            assert_eq!(key, "num_classes");
            assert!(problem.contains("more than once"), "{problem}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn duplicate_keys_in_a_batch_header_are_errors_naming_them() {
    let path = golden();
    let flags = ConfigOverrides::default();
    // Inside the config JSON string.
    let bytes = with_header(|h| {
        h.replacen(
            r#"{\"num_classes\": 21,"#,
            r#"{\"num_classes\": 21, \"num_classes\": 5,"#,
            1,
        )
    });
    let err = BatchFile::from_bytes(&bytes, &path, &flags).unwrap_err();
    assert!(
        matches!(&err, Error::Config { key, .. } if key == "num_classes"),
        "{err}"
    );
    // In __metadata__.
    let bytes = with_header(|h| h.replacen(r#""seed":"2001","#, r#""seed":"2001","seed":"7","#, 1));
    let err = BatchFile::from_bytes(&bytes, &path, &flags).unwrap_err();
    assert!(
        err.to_string()
            .contains("`__metadata__` → `seed` appears more than once"),
        "{err}"
    );
    // A tensor name at the top level.
    let bytes = with_header(|h| {
        let start = h.find(r#""priors":"#).unwrap();
        let end = start + h[start..].find('}').unwrap() + 1;
        format!("{}{},{}", &h[..start], &h[start..end], &h[start..])
    });
    let err = BatchFile::from_bytes(&bytes, &path, &flags).unwrap_err();
    assert!(
        err.to_string().contains("`priors` appears more than once"),
        "{err}"
    );

    // Through the binary: exit 2 naming the key.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dup.safetensors");
    std::fs::write(
        &file,
        with_header(|h| {
            h.replacen(
                r#"{\"num_classes\": 21,"#,
                r#"{\"num_classes\": 21, \"num_classes\": 5,"#,
                1,
            )
        }),
    )
    .unwrap();
    let run = run(&["eval", file.to_str().unwrap(), "--backend", "cpu"], None);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("config `num_classes`: given more than once"),
        "{}",
        run.stderr
    );
}
