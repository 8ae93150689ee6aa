//! One test of the current test binary run alone in a child process, and the memory
//! figures such a child reports (`/proc/<pid>/status`, Linux).

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The peak resident set size of this process so far, in KiB (`VmHWM`).
pub fn peak_rss_kib() -> u64 {
    proc_status_kib(std::process::id(), "VmHWM")
}

/// Runs the test named `name` (exactly) of the current test binary in a child process with
/// `env` set, one test thread, output captured; panics with its output when it fails, and
/// returns its stdout.
pub fn run_test(name: &str, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().expect("current test binary");
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the child test");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child {name} failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The number after `key` on the first stdout line that contains it (a child prints, say,
/// `VmHWM_KIB 51234 before_kib 40000`); the line is echoed so the parent's log shows it.
pub fn reported(stdout: &str, key: &str) -> u64 {
    let line = stdout
        .lines()
        .find_map(|l| l.find(key).map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("no {key} in {stdout}"));
    println!("{line}");
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {key} in {line:?}"))
}
