//! Tests of the takeover exchange (both sides over socket pairs), the liveness checks and the
//! upgrade socket's path handling.

use super::*;

/// A process that ran and was reaped: its pid is free (not reused this soon).
fn dead_pid() -> i32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id() as i32;
    c.wait().unwrap();
    pid
}

/// A temporary directory, removed when dropped (a failed test included).
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "router-{what}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An upgrade socket's path: listened on (`Some`: the old process runs), or left by
/// a listener that is gone (the old process died).
fn upgrade_path(dir: &TempDir, listening: bool) -> (PathBuf, Option<UnixListener>) {
    let path = dir.0.join(format!("up-{}.sock", fastrand::u64(..)));
    let l = UnixListener::bind(&path).unwrap();
    (path, listening.then_some(l))
}

/// The new process's side of the exchange on one end of a socket pair, the old
/// process played on the other end; its upgrade socket is at `path`.
fn confirm_with(
    path: &Path,
    pid: Option<i32>,
    timeout: Duration,
    old: impl FnOnce(UnixStream) -> UnixStream + Send + 'static,
) -> (anyhow::Result<Taken>, UnixStream, UnixStream) {
    let (new, old_end) = UnixStream::pair().unwrap();
    let played = std::thread::spawn(move || {
        let mut r = BufReader::new(old_end.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "ready ack\n");
        old(old_end)
    });
    let res = confirm(&new, path, pid, timeout, Duration::from_millis(300));
    (res, new, played.join().unwrap())
}

#[test]
fn ok_confirms_and_no_refuses() {
    let dir = TempDir::new("confirm");
    let (path, _l) = upgrade_path(&dir, true);
    let me = Some(std::process::id() as i32);
    let (res, _, _) = confirm_with(&path, me, Duration::from_secs(5), |mut c| {
        c.write_all(b"ok\n").unwrap();
        c
    });
    assert_eq!(res.unwrap(), Taken::Confirmed);
    let (res, _, _) = confirm_with(&path, me, Duration::from_secs(5), |mut c| {
        c.write_all(b"no\n").unwrap();
        c
    });
    assert!(format!("{:#}", res.unwrap_err()).contains("refused"));
}

/// The connection closed without an answer: a refusal while the old process runs (a
/// build that closes instead of saying `no`: its upgrade socket still accepts), the
/// end of it once it is gone (it died before it could answer: its upgrade socket
/// refuses): then this process must go on. The pid does not decide: unknown (another
/// pid namespace), or a live process's (a reused pid), or a dead one's.
#[test]
fn a_close_without_an_answer_is_a_refusal_unless_the_old_process_is_gone() {
    let dir = TempDir::new("confirm");
    let close = |c: UnixStream| {
        c.shutdown(std::net::Shutdown::Both).unwrap();
        c
    };
    let me = Some(std::process::id() as i32);
    for pid in [me, None, Some(dead_pid())] {
        // Runs: a refusal, whatever the pid says.
        let (path, _l) = upgrade_path(&dir, true);
        let (res, _, _) = confirm_with(&path, pid, Duration::from_secs(5), close);
        assert!(res.is_err(), "{pid:?}: {res:?}");
        // Gone: its socket refuses connections (or is not there).
        let (path, _) = upgrade_path(&dir, false);
        let (res, _, _) = confirm_with(&path, pid, Duration::from_secs(5), close);
        assert_eq!(res.unwrap(), Taken::OldGone, "{pid:?}");
        let path = dir.0.join("none.sock");
        let (res, _, _) = confirm_with(&path, pid, Duration::from_secs(5), close);
        assert_eq!(res.unwrap(), Taken::OldGone, "{pid:?}");
    }
}

/// The old side takes a probe (a connection that sends nothing) for no takeover
/// attempt: nothing is frozen or handed over, and it goes on serving.
#[test]
fn a_probe_is_not_a_takeover_attempt() {
    let (new, old_end) = UnixStream::pair().unwrap();
    drop(new);
    let mut r = BufReader::new(old_end);
    let mut line = String::new();
    // What [`hand_over`] reads first: the end of the connection, nothing asked.
    assert_eq!(r.read_line(&mut line).unwrap(), 0);
    assert_eq!(probe(Path::new("/nonexistent/router/up.sock")), Probe::Gone);
}

/// A wedged old process (it accepts, but never hands its state over) does not hang
/// the new one for ever.
#[test]
fn take_gives_up_on_a_wedged_old_process() {
    let dir = TempDir::new("take");
    let (path, l) = upgrade_path(&dir, true);
    let l = l.unwrap();
    let held = std::thread::spawn(move || l.accept().map(|(c, _)| c));
    let t = Instant::now();
    let res = take_within(&path, Duration::from_millis(300));
    let err = format!("{:#}", res.err().expect("took from a wedged process"));
    assert!(err.contains("did not hand its state over"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(held.join());
}

/// After the new process stopped waiting, an `ok` the old one writes fails (its end
/// is shut), so the old process does not drain for a takeover the new one gave up on,
/// even while the new one has not closed the connection yet.
#[test]
fn a_late_ok_fails_on_the_old_side() {
    let dir = TempDir::new("confirm");
    let (path, _l) = upgrade_path(&dir, true);
    let me = Some(std::process::id() as i32);
    let (res, new, mut old) = confirm_with(&path, me, Duration::from_millis(200), |c| c);
    assert!(format!("{:#}", res.unwrap_err()).contains("did not confirm"));
    // `new` is still open here.
    let late = old.write_all(b"ok\n");
    assert!(late.is_err(), "a late ok was taken: {late:?}");
    drop(new);
}

#[test]
fn liveness_from_proc() {
    assert!(alive(std::process::id() as i32));
    assert!(!alive(dead_pid()));
    // A zombie (exited, not reaped) is gone.
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the child never exited");
        std::thread::sleep(Duration::from_millis(10));
    }
    c.wait().unwrap();
}

#[test]
fn warnings_are_due_once_per_period() {
    let mut every = Every::new(Duration::from_secs(60));
    let t = Instant::now();
    assert_eq!(every.due(t), Some(0));
    // Every 100 ms for a minute: one warning.
    for i in 1..600 {
        assert_eq!(every.due(t + Duration::from_millis(100 * i)), None);
    }
    assert_eq!(every.due(t + Duration::from_secs(60)), Some(599));
}

/// Only an attempt that got the state can have left the path to a successor's socket;
/// a probe (a connection that asked for nothing) never re-binds, known file or not.
#[test]
fn the_path_is_bound_again_only_after_a_takeover_that_got_the_state() {
    let (a, b) = (Some((1, 2)), Some((1, 3)));
    assert!(!rebind_needed(false, None, a));
    assert!(!rebind_needed(false, a, b));
    assert!(!rebind_needed(true, a, a));
    assert!(rebind_needed(true, a, b));
    assert!(rebind_needed(true, None, a));
}

/// Binding sweeps the temporary names no process listens on, and only those: not a
/// live successor's, whatever the pid in its name says (another pid namespace).
#[test]
fn stale_staged_sockets_are_swept() {
    let dir = TempDir::new("staged");
    let dir = &dir.0;
    let path = dir.join("up.sock");
    let dead = dir.join(format!(".up.sock.{}", dead_pid()));
    let live = dir.join(format!(".up.sock.{}", std::process::id()));
    let parent = dir.join(format!(".up.sock.{}", std::os::unix::process::parent_id()));
    let listening = dir.join(format!(".up.sock.{}", dead_pid()));
    let other = dir.join(format!(".other.sock.{}", dead_pid()));
    let plain = dir.join(format!(".up.sock.{}x", dead_pid()));
    for p in [&dead, &live, &parent, &other] {
        drop(UnixListener::bind(p).unwrap());
    }
    let _successor = UnixListener::bind(&listening).unwrap();
    std::fs::write(&plain, b"").unwrap();
    let u = Upgrade::bind(&path, false).unwrap();
    assert!(!dead.exists(), "a dead process's staged socket was kept");
    assert!(
        !parent.exists(),
        "a staged socket no one listens on was kept"
    );
    for p in [&live, &listening, &other, &plain] {
        assert!(p.exists(), "{} removed", p.display());
    }
    drop(u);
}
