//! TTY jobs in real containers (root only; skipped otherwise), through `POST /attach`: the
//! job's stdin, stdout and stderr are a terminal of the size the client asked for, its
//! output reaches the client raw (a prompt without a newline at once), input and resizes
//! reach it, an empty stdin frame is its end of input, its terminal survives a daemon
//! restart, and its log gets lines.

use flynn_client::host::attach::{STDIN, STDOUT, STREAM};
use flynn_client::host::{AttachRequest, Attached, Frame, NetworkConfig};

use super::*;

const T: Duration = Duration::from_secs(30);

fn tty_job(id: &str, script: &str) -> Job {
    let mut job = bb_job(id, script);
    job.config.tty = true;
    job
}

async fn attach(c: &flynn_client::host::Client, id: &str, size: (u16, u16)) -> Attached {
    c.attach(&AttachRequest {
        job_id: id.to_string(),
        flags: STDOUT | STDIN | STREAM,
        height: size.0,
        width: size.1,
    })
    .await
    .unwrap()
}

/// Flags for a daemon whose jobs wait for their network until [`release_network`]: a client
/// attaching meanwhile is in before the job's start reads the size it asked for, however
/// loaded the machine is (without the hold, a start that wins the race gets the size later,
/// as a resize: a `SIGWINCH`, and a job that saw 0x0 first).
const HELD: [&str; 3] = ["--network-from-agent", "--netns-pool", "1"];

/// Gives a daemon started with [`HELD`] its network (as the overlay agent would): its jobs
/// start.
async fn release_network(c: &flynn_client::host::Client) {
    c.configure_network(&NetworkConfig {
        job_id: "flannel".into(),
        subnet: "100.100.7.1/24".into(),
        mtu: 1450,
        resolvers: Vec::new(),
    })
    .await
    .unwrap();
}

/// What a client saw: the terminal's bytes, the stream EOF and the exit status.
#[derive(Debug, Default)]
struct Term {
    out: Vec<u8>,
    eof: bool,
    exit: Option<u32>,
}

impl Term {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }

    /// The output's lines as the terminal ends them (`\r\n`).
    fn lines(&self) -> Vec<String> {
        self.text().split("\r\n").map(str::to_string).collect()
    }

    /// Reads frames until the output holds `want` (or, with `None`, until the end).
    async fn until(&mut self, a: &mut Attached, want: Option<&str>) {
        loop {
            if want.is_some_and(|w| self.text().contains(w)) {
                return;
            }
            let f = tokio::time::timeout(T, a.next())
                .await
                .unwrap_or_else(|_| panic!("no frame within {T:?} waiting for {want:?}: {self:?}"))
                .expect("a well-formed frame");
            match f {
                Some(Frame::Data { stream: 1, data }) if data.is_empty() => self.eof = true,
                Some(Frame::Data { stream: 1, data }) => {
                    assert!(!self.eof, "data after EOF: {self:?}");
                    self.out.extend_from_slice(&data)
                }
                Some(Frame::Exit(s)) => self.exit = Some(s),
                Some(Frame::Waiting | Frame::Success) => {}
                Some(f) => panic!("unexpected {f:?}: {self:?}"),
                None if want.is_none() => return,
                None => panic!("ended before {want:?}: {self:?}"),
            }
        }
    }
}

#[test]
fn a_tty_job_runs_on_a_terminal_of_the_attached_clients_size() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let ch = CHost::start(&HELD);
        let c = &ch.host.client;
        let id = ch.host.job_id("ttysize");
        // (The trap shows a size set after the job started: it is not.)
        let script = "trap 'echo winch' WINCH; tty; stty size; sleep 0.5";
        c.add_job(&tty_job(&id, script)).await.unwrap();
        // Attached while the job starts (as `flynn run` does; held until the client is in):
        // the job starts with the size.
        let mut a = attach(c, &id, (20, 10)).await;
        release_network(c).await;
        let mut t = Term::default();
        t.until(&mut a, None).await;
        let lines = t.lines();
        assert!(lines[0].starts_with("/dev/pts/"), "{t:?}");
        assert_eq!(lines[1..], ["20 10", ""], "{t:?}");
        assert!(t.eof, "stdout's EOF frame: {t:?}");
        assert_eq!(t.exit, Some(0), "{t:?}");
    });
}

/// Two clients attached while the job starts: it starts at the later one's size and keeps
/// it (each client applied its own size when the job started, in no fixed order: a
/// `SIGWINCH`, and at times the older client's size).
#[test]
fn a_tty_job_started_with_two_clients_keeps_the_later_ones_size() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let ch = CHost::start(&HELD);
        let c = &ch.host.client;
        let id = ch.host.job_id("ttytwo");
        let script = "trap 'echo winch' WINCH; stty size; sleep 1; stty size";
        c.add_job(&tty_job(&id, script)).await.unwrap();
        let mut older = attach(c, &id, (20, 10)).await;
        let mut later = attach(c, &id, (30, 40)).await;
        release_network(c).await;
        let mut t = Term::default();
        t.until(&mut later, None).await;
        let lines = t.lines();
        assert_eq!(lines, ["30 40", "30 40", ""], "{t:?}");
        assert_eq!(t.exit, Some(0), "{t:?}");
        Term::default().until(&mut older, None).await;
    });
}

#[test]
fn a_tty_job_gets_prompts_out_input_resizes_and_eof_in() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let (_agg, syslog, api) = logagg();
        let flags = [&HELD[..], &["--logagg", &syslog]].concat();
        let mut ch = CHost::start(&flags);
        let app = unique("app");
        let id = ch.host.job_id("ttyio");
        let script = "trap 'echo winch' WINCH; printf 'first\\nready> '; read x; echo got:$x; \
                      while [ \"$(stty size)\" = '20 10' ]; do sleep 0.05; done; stty size; \
                      while [ \"$(stty size)\" = '30 40' ]; do sleep 0.05; done; stty size; \
                      cat; echo cat-done";
        let mut job = tty_job(&id, script);
        job.config.env.insert("FLYNN_APP_ID".into(), app.clone());
        ch.host.client.add_job(&job).await.unwrap();
        // Attached while the job starts (held until the client is in): no resize later.
        let mut a = attach(&ch.host.client, &id, (20, 10)).await;
        release_network(&ch.host.client).await;
        let mut t = Term::default();
        // The prompt has no newline: it reaches the client before any input is sent.
        t.until(&mut a, Some("ready> ")).await;
        assert_eq!(t.text(), "first\r\nready> ");
        // The line before the prompt is in the log, and acknowledged to the shim: the
        // acknowledgement goes out from another task once the line is handed to the log (a
        // daemon killed before it is out gets the line again, as any output: at least once),
        // so give it time.
        let in_log = |m: &serde_json::Value| m["msg"] == "first";
        eventually(Duration::from_secs(10), "the first line in the log", || {
            log_lines(&api, &app).iter().any(in_log)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        // The terminal is the shim's: a restarted daemon finds the job's terminal again.
        drop(a);
        drop(ch.host.proc.take());
        ch.restart(&flags);
        let c = &ch.host.client;
        let mut a = attach(c, &id, (20, 10)).await;
        let mut input = a.take_input().unwrap();
        let mut t = Term::default();
        input.stdin(b"abc\n").await.unwrap();
        // The terminal echoes the input, then the job answers.
        t.until(&mut a, Some("got:abc\r\n")).await;
        assert!(t.text().ends_with("abc\r\ngot:abc\r\n"), "{t:?}");
        assert!(!t.text().contains("winch"), "{t:?}");
        // A resize frame: `stty size` sees the new size, and the job got SIGWINCH.
        input
            .send(&Frame::Resize {
                height: 30,
                width: 40,
            })
            .await
            .unwrap();
        t.until(&mut a, Some("30 40\r\n")).await;
        t.until(&mut a, Some("winch\r\n")).await;
        // A second client attaching to the running job sets the size it asks for.
        let second = attach(c, &id, (25, 50)).await;
        t.until(&mut a, Some("25 50\r\n")).await;
        drop(second);
        // Input to `cat`, then the empty stdin frame: end of input (^D), `cat` ends.
        input.stdin(b"last\n").await.unwrap();
        t.until(&mut a, Some("last\r\nlast\r\n")).await;
        input.close_stdin().await.unwrap();
        t.until(&mut a, None).await;
        assert!(t.text().ends_with("cat-done\r\n"), "{t:?}");
        assert!(t.eof, "stdout's EOF frame: {t:?}");
        assert_eq!(t.exit, Some(0), "{t:?}");

        // The log gets the terminal's output as lines (no `\r`), the prompt with the
        // echoed input on its line (across the restart: the prompt's event was kept for the
        // next daemon until its line was complete), and the line before the prompt, written
        // with it, once.
        let mut msgs: Vec<String> = Vec::new();
        eventually(
            Duration::from_secs(10),
            "the job's lines in its log",
            || {
                msgs = log_lines(&api, &app)
                    .iter()
                    .filter_map(|l| l["msg"].as_str().map(str::to_string))
                    .collect();
                msgs.iter().any(|m| m == "cat-done")
            },
        )
        .await;
        assert_eq!(msgs.iter().filter(|m| *m == "first").count(), 1, "{msgs:?}");
        for want in [
            "ready> abc",
            "got:abc",
            "30 40",
            "25 50",
            "last",
            "cat-done",
        ] {
            assert!(msgs.iter().any(|m| m == want), "{want:?} in {msgs:?}");
        }
        assert!(!msgs.iter().any(|m| m.contains('\r')), "{msgs:?}");
    });
}

/// A TTY job writing far more than the shim keeps for the daemon (4 MiB) without a newline
/// (a progress bar redrawn with `\r`) runs on: the daemon does not hold back the events of
/// a partial line without bound (it used to, and the job froze once the shim's buffer was
/// full).
#[test]
fn a_tty_job_writing_megabytes_without_a_newline_runs_on() {
    require_root!();
    busybox();
    in_netns(|_| async {
        let ch = CHost::start(&[]);
        let c = &ch.host.client;
        let id = ch.host.job_id("ttyprogress");
        // Waits for a line of input (so the daemon is connected to the job's shim: output
        // beyond the shim's buffer is dropped, not held, while none is), then writes a byte,
        // 9 MiB of `\r` and a line. (The byte, read on its own, keeps the partial line from
        // starting where the terminal's 4 KiB reads do: cut into 64 KiB pieces for the log,
        // it could otherwise end with a read now and then.)
        let script = "read go; printf x; sleep 0.2; \
                      head -c 9437184 /dev/zero | tr '\\000' '\\r'; echo done";
        c.add_job(&tty_job(&id, script)).await.unwrap();
        wait_running(c, &id).await;
        let mut a = attach(c, &id, (20, 10)).await;
        a.take_input().unwrap().stdin(b"go\n").await.unwrap();
        let mut t = Term::default();
        t.until(&mut a, Some("go\r\n")).await;
        drop(a);
        let j = wait_ended(c, &id, Duration::from_secs(60)).await;
        assert_eq!(j.exit_status, Some(0), "{j:?}");
    });
}
