//! Servers the tests start themselves (PostgreSQL, Synapse): stopped by
//! their PID with the signal that shuts each down cleanly, and by a watchdog
//! when the test process dies without running `Drop`, so none outlives its
//! test.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sends `signal` to `pid` once this test process is gone, if `still_ours`
/// (a shell condition on `$pid`) says the PID still names the server: a
/// PID reused by an unrelated process is left alone.
pub fn watchdog(pid: u32, still_ours: &str, signal: &str) {
    let owner = std::process::id();
    let script = format!(
        "pid={pid}; while kill -0 {owner} 2>/dev/null; do sleep 1; done; \
         {still_ours} && kill -{signal} $pid"
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
}

/// Sends `signal` and waits up to 10 s for the server to exit, then kills it.
pub fn stop(child: &mut Child, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
