//! Unit tests of the shim's loop: cutting output into lines, and a daemon's features and
//! the wait for them.

use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::output::Lines;
use super::poll_loop::pollfd;
use super::*;
use crate::wire::{Frame, Stream, MAX_LINE};

/// The output events in `out`: (bytes, newline).
fn lines(out: &mut Outbox) -> Vec<(Vec<u8>, bool)> {
    out.reconnect();
    let mut buf = Vec::new();
    out.encode_unsent(&mut buf, usize::MAX, true);
    let mut got = Vec::new();
    while let Some(Frame::Event(ShimEvent::Output { line, newline, .. })) =
        wire::decode(&mut buf).unwrap()
    {
        got.push((line, newline));
    }
    got
}

fn pipe() -> Lines {
    Lines {
        stream: Stream::Stdout,
        buf: Vec::new(),
        open: true,
        raw: false,
    }
}

/// With no daemon connected, a partial line waits for its newline (what is dropped for
/// want of room is whole lines); lines longer than MAX_LINE go in pieces.
#[test]
fn lines_split_across_reads_and_at_max_line() {
    let mut out = Outbox::new(1 << 30);
    let mut l = pipe();
    l.feed(b"he", &mut out, true, true);
    l.feed(b"llo\nwor", &mut out, true, true);
    l.feed(b"ld\n\n", &mut out, true, true);
    let long = vec![b'a'; MAX_LINE * 2 + 5];
    l.feed(&long, &mut out, true, true);
    l.feed(b"\ntail", &mut out, true, true);
    l.flush(&mut out, true);
    let got = lines(&mut out);
    let shape: Vec<(usize, bool)> = got.iter().map(|(l, nl)| (l.len(), *nl)).collect();
    assert_eq!(
        shape,
        vec![
            (5, true),
            (5, true),
            (0, true),
            (MAX_LINE, false),
            (MAX_LINE, false),
            (5, true),
            (4, false)
        ]
    );
    assert_eq!(got[0].0, b"hello");
    assert_eq!(got[1].0, b"world");
    assert_eq!(got[6].0, b"tail");
}

/// With a daemon connected the bytes after a read's last newline go at once, marked as
/// having no newline: the job's bytes come out exactly as written, a prompt included.
#[test]
fn a_connected_daemon_gets_partial_lines_at_once() {
    let mut out = Outbox::new(1 << 30);
    let mut l = pipe();
    l.feed(b"Password: ", &mut out, false, false);
    assert_eq!(lines(&mut out), vec![(b"Password: ".to_vec(), false)]);
    let mut out = Outbox::new(1 << 30);
    let mut rng = fastrand::Rng::with_seed(3);
    let mut written = Vec::new();
    for _ in 0..200 {
        let len = rng.usize(0..3 * MAX_LINE / 2);
        let chunk: Vec<u8> = (0..len)
            .map(|_| if rng.u8(..40) == 0 { b'\n' } else { b'x' })
            .collect();
        written.extend_from_slice(&chunk);
        l.feed(&chunk, &mut out, false, false);
        assert!(l.buf.is_empty());
    }
    let mut got = Vec::new();
    for (piece, newline) in lines(&mut out) {
        assert!(piece.len() <= MAX_LINE);
        got.extend_from_slice(&piece);
        if newline {
            got.push(b'\n');
        }
    }
    assert_eq!(got, written);
    // A partial line held while no daemon was connected goes once one is.
    let mut out = Outbox::new(1 << 30);
    l.feed(b"a\nb", &mut out, true, true);
    l.flush(&mut out, false);
    assert_eq!(
        lines(&mut out),
        vec![(b"a".to_vec(), true), (b"b".to_vec(), false)]
    );
}

/// A terminal's output goes as read: a prompt without a newline is not held back, and
/// `\r\n` and partial lines stay as they are; a read is cut after its last newline.
#[test]
fn terminal_output_is_raw() {
    let mut out = Outbox::new(1 << 30);
    let mut t = Lines {
        stream: Stream::Stdout,
        buf: Vec::new(),
        open: true,
        raw: true,
    };
    t.feed(b"ready> ", &mut out, false, false);
    t.feed(b"abc\r\ngot:abc\r\n", &mut out, false, false);
    // Cut after the last newline: the next partial line starts an event.
    t.feed(b"a\r\nb\r\nnext> ", &mut out, false, false);
    t.feed(b"1%\r2%\r", &mut out, false, false);
    t.flush(&mut out, false);
    out.reconnect();
    let mut buf = Vec::new();
    out.encode_unsent(&mut buf, usize::MAX, true);
    let mut got = Vec::new();
    while let Some(Frame::Event(ev)) = wire::decode(&mut buf).unwrap() {
        got.push(ev);
    }
    assert_eq!(
        got,
        vec![
            ShimEvent::Terminal {
                data: b"ready> ".to_vec()
            },
            ShimEvent::Terminal {
                data: b"abc\r\ngot:abc\r\n".to_vec()
            },
            ShimEvent::Terminal {
                data: b"a\r\nb\r\n".to_vec()
            },
            ShimEvent::Terminal {
                data: b"next> ".to_vec()
            },
            ShimEvent::Terminal {
                data: b"1%\r2%\r".to_vec()
            },
        ]
    );
}

/// The connection's wait for the daemon's features is over.
fn expire(shim: &mut ShimLoop) {
    shim.client.as_mut().unwrap().deadline = Instant::now();
}

/// The frames (kind, payload) a daemon's end of a connection has to read now.
fn frames_read(d: &mut UnixStream) -> Vec<(u8, Vec<u8>)> {
    d.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 65536];
    while let Ok(n @ 1..) = d.read(&mut chunk) {
        bytes.extend_from_slice(&chunk[..n]);
    }
    let mut frames = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u32::from_be_bytes(bytes[at + 1..at + 5].try_into().unwrap()) as usize;
        frames.push((bytes[at], bytes[at + 5..at + 5 + len].to_vec()));
        at += 5 + len;
    }
    assert_eq!(at, bytes.len(), "whole frames");
    frames
}

/// A daemon of the protocol's first version (it announces no features, and fails a
/// connection on frame kinds it does not know) gets only whole-line frames: a partial
/// line is held for its newline, and what must go without one (at the pipe's end)
/// goes as a line. A daemon that announces `PARTIAL_OUTPUT` gets pieces, the held
/// partial line first. Events wait for the announcement (up to `FEATURES_WAIT`).
#[test]
fn a_daemon_without_the_feature_gets_only_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path(), "j");
    // Past only when the test says (`expire`): a stall of the test's own changes
    // nothing.
    let mut shim = test_shim(&layout, Duration::from_secs(3600));
    let mut l = pipe();
    let feed = |shim: &mut ShimLoop, l: &mut Lines, data: &[u8]| {
        let hold = !shim.partial_ok();
        l.feed(data, &mut shim.outbox, shim.client.is_none(), hold);
    };

    let mut old = UnixStream::connect(layout.socket()).unwrap();
    shim.accept();
    assert!(!shim.partial_ok());
    feed(&mut shim, &mut l, b"a\nPassword: ");
    let long = vec![b'x'; MAX_LINE + 3];
    feed(&mut shim, &mut l, b"b\n");
    feed(&mut shim, &mut l, &long);
    // Nothing but HELLO until the daemon had time to announce its features.
    shim.write_client();
    let got = frames_read(&mut old);
    assert_eq!(got.iter().map(|f| f.0).collect::<Vec<_>>(), [wire::HELLO]);
    expire(&mut shim);
    // The pipe ends with a partial line: it goes, as a line.
    l.flush(&mut shim.outbox, false);
    shim.write_client();
    let got = frames_read(&mut old);
    let want: Vec<(u8, Vec<u8>)> = vec![
        (wire::STDOUT, b"a".to_vec()),
        (wire::STDOUT, b"Password: b".to_vec()),
        (wire::STDOUT, long[..MAX_LINE].to_vec()),
        (wire::STDOUT, long[MAX_LINE..].to_vec()),
    ];
    assert_eq!(got, want);

    // A daemon that reads pieces: the same events, pieces as pieces, and a partial
    // line at once.
    let mut new = UnixStream::connect(layout.socket()).unwrap();
    let mut announce = Vec::new();
    wire::encode_features(wire::PARTIAL_OUTPUT, &mut announce);
    new.write_all(&announce).unwrap();
    shim.accept();
    shim.read_client();
    assert!(shim.partial_ok());
    feed(&mut shim, &mut l, b"c\nready> ");
    shim.write_client();
    let got = frames_read(&mut new);
    let kinds: Vec<u8> = got.iter().map(|f| f.0).collect();
    assert_eq!(
        kinds,
        [
            wire::HELLO,
            wire::STDOUT,
            wire::STDOUT,
            wire::STDOUT_PART,
            wire::STDOUT_PART,
            wire::STDOUT,
            wire::STDOUT_PART,
        ]
    );
    assert_eq!(got[6].1, b"ready> ");
}

/// A daemon that announced its features as it connected gets pieces even when the shim
/// gets to the connection after its wait for them is over (descheduled on a loaded
/// machine): the announcement is read before the shim settles for whole lines, at
/// `accept` or at the first write past the wait. It used to settle by the clock, and a
/// new daemon then got whole lines (newlines added to a job's output).
#[test]
fn a_late_shim_still_reads_the_daemons_announcement() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path(), "j");
    // Over as soon as it starts: the shim is as late as can be.
    let mut shim = test_shim(&layout, Duration::ZERO);
    let mut announce = Vec::new();
    wire::encode_features(wire::PARTIAL_OUTPUT, &mut announce);
    let mut l = pipe();
    for announced_before_accept in [true, false] {
        let mut d = UnixStream::connect(layout.socket()).unwrap();
        if announced_before_accept {
            d.write_all(&announce).unwrap();
        }
        shim.accept();
        if !announced_before_accept {
            d.write_all(&announce).unwrap();
        }
        // Past the wait: settled, one way or the other.
        shim.write_client();
        let hold = !shim.partial_ok();
        l.feed(b"a\nready> ", &mut shim.outbox, false, hold);
        shim.write_client();
        assert!(
            shim.partial_ok(),
            "before accept: {announced_before_accept}"
        );
        let got = frames_read(&mut d);
        let kinds: Vec<u8> = got.iter().map(|f| f.0).collect();
        assert!(
            kinds.contains(&wire::STDOUT_PART),
            "before accept: {announced_before_accept}: {got:?}"
        );
        assert_eq!(got.last().unwrap().1, b"ready> ");
        // Acknowledged: the next connection gets only what follows.
        let seq = shim.outbox.reconnect();
        shim.outbox.ack(seq);
    }
}

/// A shim serving `layout`'s socket, with no job, waiting `features_wait` for a new
/// connection's features.
fn test_shim(layout: &Layout, features_wait: Duration) -> ShimLoop {
    fs::create_dir_all(&layout.dir).unwrap();
    let listener = UnixListener::bind(layout.socket()).unwrap();
    listener.set_nonblocking(true).unwrap();
    let spec: ContainerSpec = serde_json::from_value(serde_json::json!({
        "id": "j", "layers": [], "args": ["sh"], "env": [], "cwd": "",
        "hostname": null, "netns": null, "mounts": [], "resources": {},
        "cgroup_parent": "flynn",
    }))
    .unwrap();
    ShimLoop {
        layout: layout.clone(),
        spec,
        listener,
        client: None,
        outbox: Outbox::new(1 << 30),
        final_queued: false,
        pid: 0,
        signals: Vec::new(),
        stdin_hold: None,
        window: None,
        features_wait,
    }
}

/// Writes `frame` to `d` after `after` (in a thread): wakes a shim's poll that waits for
/// the daemon, as it would have waited for whatever the daemon sent next.
fn later(d: &UnixStream, after: Duration, frame: Vec<u8>) -> std::thread::JoinHandle<()> {
    let mut d = d.try_clone().unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(after);
        let _ = d.write_all(&frame);
    })
}

/// A signal (or a window size) the daemon sent after the shim accepted it, read only at
/// the end of the wait for its features (`write_client`: a daemon of the protocol's
/// first version announces none), is acted on without waiting for more from the
/// daemon: the loop does not sleep in `poll` with it pending. It used to wait (the
/// socket was drained): a quiet job's SIGTERM until the stop's SIGKILL.
#[test]
fn a_signal_read_at_the_end_of_the_features_wait_does_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path(), "j");
    let mut shim = test_shim(&layout, Duration::from_secs(3600));
    let mut d = UnixStream::connect(layout.socket()).unwrap();
    shim.accept();
    let mut frames = Vec::new();
    wire::encode_signal(libc::SIGTERM, &mut frames);
    wire::encode_resize(40, 100, &mut frames);
    d.write_all(&frames).unwrap();
    expire(&mut shim);
    let read = shim.write_client();
    assert!(read);
    assert_eq!(shim.signals, [libc::SIGTERM]);
    assert_eq!(shim.window, Some((40, 100)));
    // The poll step as `run_job` takes it: the listener and the connection.
    let mut ack = Vec::new();
    wire::encode_u64(wire::ACK, 0, &mut ack);
    let waker = later(&d, Duration::from_secs(3), ack);
    let sock = shim.client.as_ref().unwrap().sock.as_raw_fd();
    let mut fds = [
        pollfd(shim.listener.as_raw_fd(), libc::POLLIN),
        pollfd(sock, libc::POLLIN),
    ];
    let t = Instant::now();
    let timeout = shim.poll_timeout(read, None);
    shim.poll(&mut fds, timeout);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "slept {:?} with a signal pending",
        t.elapsed()
    );
    // Pending work alone keeps the loop awake; none, and it sleeps.
    assert_eq!(shim.poll_timeout(false, None), Some(Duration::ZERO));
    shim.signals.clear();
    assert_eq!(shim.poll_timeout(false, None), Some(Duration::ZERO));
    shim.window = None;
    assert_eq!(shim.poll_timeout(false, None), None);
    waker.join().unwrap();
    drop(d);
}

/// The final event's ack, sent by a daemon (of the protocol's first version) that
/// reconnected, and read only at the end of the wait for its features (in
/// `write_client`), ends the shim's wait for it at once: it used to sleep in `poll`
/// (the socket drained) until the daemon sent something else.
#[test]
fn the_final_ack_read_at_the_end_of_the_features_wait_ends_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path(), "j");
    let mut shim = test_shim(&layout, Duration::from_secs(3600));
    shim.finish(ShimEvent::Exited {
        code: Some(0),
        signal: None,
        oom_killed: false,
    });
    // The daemon had it on a connection that broke before its ack got through.
    let d = UnixStream::connect(layout.socket()).unwrap();
    shim.accept();
    let mut ack = Vec::new();
    wire::encode_u64(wire::ACK, 1, &mut ack);
    (&d).write_all(&ack).unwrap();
    expire(&mut shim);
    let waker = later(&d, Duration::from_secs(3), ack);
    let t = Instant::now();
    shim.until_acked();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "waited {:?} with the final event acked",
        t.elapsed()
    );
    waker.join().unwrap();
}
