//! TTY jobs: a terminal from the container's own devpts as the job's stdin, stdout and stderr;
//! raw output, input through the stdin FIFO, window size, end of input as ^D.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use flynn_container::{Shim, ShimConn, ShimEvent};

use crate::support::{collect_into, next, require_root, Env, Run};

const T: Duration = Duration::from_secs(30);

/// Reads events until the terminal output holds `want` (bounded by `within`).
async fn until(conn: &mut ShimConn, run: &mut Run, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !String::from_utf8_lossy(&run.terminal).contains(want) {
        assert!(run.last.is_none(), "job ended before {want:?}: {run:?}");
        let left = deadline.saturating_duration_since(Instant::now());
        match next(conn, left).await {
            Some(ev) => run.add(ev),
            None => panic!("finished before {want:?}: {run:?}"),
        }
    }
}

/// The job's stdin FIFO, opened to write as the daemon does (non-blocking open).
fn open_stdin(conn: &ShimConn) -> std::fs::File {
    let path = conn.stdin_path().expect("a TTY job has a stdin FIFO");
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

#[tokio::test]
async fn a_tty_job_runs_on_a_terminal_of_the_size_asked_for() {
    require_root!();
    let env = Env::new("tty");
    // Not root in the container: the terminal is still its own (owned by the job's user, as
    // runc makes it: it can open it again by name).
    let mut spec = env.spec(
        "size",
        &[
            "sh",
            "-c",
            "tty; stty size; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-tty; echo TERM=$TERM; \
             stat -c %u $(tty); echo reopened > $(tty)",
        ],
    );
    spec.tty = true;
    spec.tty_size = Some((20, 10));
    spec.uid = 1000;
    let mut conn = env.spawn(&spec).await;
    assert!(conn.is_tty());
    let mut run = Run::default();
    collect_into(&mut conn, &mut run, T).await;
    let out = String::from_utf8_lossy(&run.terminal).into_owned();
    // The terminal's line discipline turns `\n` into `\r\n`.
    let lines: Vec<&str> = out.split("\r\n").collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(
        lines[1..],
        ["20 10", "all-tty", "TERM=xterm", "1000", "reopened", ""],
        "{out:?}"
    );
    assert!(run.stdout.is_empty() && run.stderr.is_empty(), "{run:?}");
    assert_eq!(run.exit_code(), Some(0));
    env.cleanup_and_check(&spec);
}

#[tokio::test]
async fn a_tty_job_takes_input_resizes_and_ends_input_with_eof() {
    require_root!();
    let env = Env::new("ttyio");
    // (busybox's `stty size` fails on a 0x0 terminal: the loop waits for the resize.)
    let script = "trap 'echo winch' WINCH; printf 'ready> '; read x; echo got:$x; \
                  until s=$(stty size 2>/dev/null) && [ -n \"$s\" ] && [ \"$s\" != '0 0' ]; \
                  do sleep 0.05; done; echo $s; \
                  cat; echo cat-done";
    let mut spec = env.spec("io", &["sh", "-c", script]);
    spec.tty = true;
    let mut conn = env.spawn(&spec).await;
    let mut run = Run::default();
    // The prompt has no newline: it comes before any input is sent.
    until(&mut conn, &mut run, "ready> ", T).await;
    assert_eq!(String::from_utf8_lossy(&run.terminal), "ready> ");

    // The terminal is the shim's, not the daemon's: a daemon that reconnects finds it.
    drop(conn);
    let mut conn = Shim::connect(&env.state, &spec.id).await.unwrap();
    let mut run = Run::default();
    let mut stdin = open_stdin(&conn);
    stdin.write_all(b"abc\n").unwrap();
    // Echoed by the terminal, then the job's answer.
    until(&mut conn, &mut run, "got:abc\r\n", T).await;
    assert!(
        String::from_utf8_lossy(&run.terminal).ends_with("abc\r\ngot:abc\r\n"),
        "{run:?}"
    );

    // The window size the job sees changes, with SIGWINCH.
    conn.resize(30, 40).await.unwrap();
    until(&mut conn, &mut run, "30 40\r\n", T).await;
    until(&mut conn, &mut run, "winch", T).await;

    // Closing stdin is the terminal's end of file: `cat` ends.
    stdin.write_all(b"last\n").unwrap();
    until(&mut conn, &mut run, "last\r\nlast\r\n", T).await;
    drop(stdin);
    conn.close_stdin().await.unwrap();
    collect_into(&mut conn, &mut run, T).await;
    assert!(
        String::from_utf8_lossy(&run.terminal).ends_with("cat-done\r\n"),
        "{run:?}"
    );
    assert_eq!(run.exit_code(), Some(0));
    env.cleanup_and_check(&spec);
}

/// Closing stdin ends the input also after input without a newline: in canonical mode the
/// first end-of-file character only hands the pending input over (as ^D after typing does),
/// so the shim sends a second one.
#[tokio::test]
async fn closing_stdin_after_a_partial_line_ends_the_input() {
    require_root!();
    let env = Env::new("ttyeof");
    let mut spec = env.spec("eof", &["sh", "-c", "wc -c; echo wc-done"]);
    spec.tty = true;
    let mut conn = env.spawn(&spec).await;
    let mut run = Run::default();
    // The FIFO is there once the job started.
    let ev = next(&mut conn, T).await;
    assert!(matches!(ev, Some(ShimEvent::Started { .. })), "{ev:?}");
    let mut stdin = open_stdin(&conn);
    stdin.write_all(b"abc").unwrap();
    // Echoed by the terminal: the input reached it.
    until(&mut conn, &mut run, "abc", T).await;
    drop(stdin);
    conn.close_stdin().await.unwrap();
    collect_into(&mut conn, &mut run, Duration::from_secs(10)).await;
    let out = String::from_utf8_lossy(&run.terminal).into_owned();
    assert!(out.ends_with("abc3\r\nwc-done\r\n"), "{out:?}");
    assert_eq!(run.exit_code(), Some(0));
    env.cleanup_and_check(&spec);
}
