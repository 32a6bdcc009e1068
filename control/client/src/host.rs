//! The flynn-host job API client (spec §5.3).

use std::collections::BTreeMap;
use std::time::Duration;

use flynn_api::ApiError;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::json_http::JsonHttp;

pub use flynn_api::attach::{self, AttachRequest, Frame};

pub use flynn_api::host::{
    ActiveJob, CheckPort, ContainerConfig, Event, EventKind, HostStatus, Job, JobStatus, Mount,
    MountSpec, NetworkConfig, Port, ResourceCheck, Resources, Service, Spec, Volume, VolumeBinding,
    VolumeCreate,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Api(ApiError),
    #[error("host request failed")]
    Http(#[source] reqwest::Error),
    #[error("host answered {status}")]
    Status { status: u16 },
    /// An answer longer than the client reads (`limit` bytes).
    #[error("host answer longer than {limit} bytes")]
    TooLarge { limit: usize },
    /// The detail is in the message (callers log errors with `%e`), not also a `source`.
    #[error("host answer is not the JSON expected: {0}")]
    Decode(serde_json::Error),
    /// No answer (its head) in time: see [`Client::events`] and [`Client::attach`].
    #[error("host did not answer in {after:?}")]
    TimedOut { after: Duration },
    /// The attach connection failed or carried something that is not a frame.
    #[error("attach: {0}")]
    Attach(String),
}

impl Error {
    /// The API error, when the server sent an envelope.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Error::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// Largest answer read: a host's job list (every job it knows, with up to 25 stopped ones
/// per app kept) can run to thousands of jobs of a few KiB each, past the other clients'
/// limit; a longer answer fails once it gets here.
const MAX_BODY: usize = 64 << 20;

/// How long [`Client::events`] and [`Client::attach`] (which have no request timeout: their
/// answers go on for as long as the job does) wait for the head of the host's answer: it
/// sends it at once (an attach to a job not created yet waits after the upgrade), so a host
/// that accepted the connection and says nothing is hung.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// `answer`, or [`Error::TimedOut`] after [`ANSWER_WAIT`].
async fn head<T>(answer: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, Error> {
    match tokio::time::timeout(ANSWER_WAIT, answer).await {
        Ok(r) => r,
        Err(_) => Err(Error::TimedOut { after: ANSWER_WAIT }),
    }
}

/// A client for one host's job API, e.g. `http://127.0.0.1:1113`.
#[derive(Clone)]
pub struct Client {
    http: JsonHttp,
}

crate::json_http::from_failure!(Error);

impl Client {
    pub fn new(url: &str) -> Client {
        Client {
            http: JsonHttp::new(url),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, Error> {
        Ok(self.http.send(method, path, body).await?)
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, Error> {
        let resp = self.send(method, path, body).await?;
        Ok(crate::json_http::json(resp, MAX_BODY).await?)
    }

    /// `PUT /host/jobs/:id`: accepted; the job starts asynchronously.
    pub async fn add_job(&self, job: &Job) -> Result<(), Error> {
        let body = serde_json::to_vec(job).unwrap_or_default();
        self.send(
            reqwest::Method::PUT,
            &format!("/host/jobs/{}", job.id),
            Some(body),
        )
        .await
        .map(drop)
    }

    pub async fn get_job(&self, id: &str) -> Result<ActiveJob, Error> {
        self.json(reqwest::Method::GET, &format!("/host/jobs/{id}"), None)
            .await
    }

    /// Every job the host knows (`active` = only starting and running ones).
    pub async fn list_jobs(&self, active: bool) -> Result<BTreeMap<String, ActiveJob>, Error> {
        let q = if active { "?active=true" } else { "" };
        self.json(reqwest::Method::GET, &format!("/host/jobs{q}"), None)
            .await
    }

    /// `DELETE /host/jobs/:id`: SIGTERM, then SIGKILL after the job's stop timeout.
    pub async fn stop_job(&self, id: &str) -> Result<(), Error> {
        self.send(reqwest::Method::DELETE, &format!("/host/jobs/{id}"), None)
            .await
            .map(drop)
    }

    pub async fn signal(&self, id: &str, signal: i32) -> Result<(), Error> {
        self.send(
            reqwest::Method::PUT,
            &format!("/host/jobs/{id}/signal/{signal}"),
            None,
        )
        .await
        .map(drop)
    }

    /// Stops the job's discoverd heartbeats (its instances are removed).
    pub async fn discoverd_deregister(&self, id: &str) -> Result<(), Error> {
        self.send(
            reqwest::Method::PUT,
            &format!("/host/jobs/{id}/discoverd-deregister"),
            None,
        )
        .await
        .map(drop)
    }

    pub async fn status(&self) -> Result<HostStatus, Error> {
        self.json(reqwest::Method::GET, "/host/status", None).await
    }

    /// 409 conflict with `detail.ports` when a port is in use.
    pub async fn resource_check(&self, check: &ResourceCheck) -> Result<(), Error> {
        let body = serde_json::to_vec(check).unwrap_or_default();
        self.send(reqwest::Method::POST, "/host/resource-check", Some(body))
            .await
            .map(drop)
    }

    /// `POST /host/network`: hands the host its job block (the overlay agent's notify).
    pub async fn configure_network(&self, cfg: &NetworkConfig) -> Result<(), Error> {
        let body = serde_json::to_vec(cfg).unwrap_or_default();
        self.send(reqwest::Method::POST, "/host/network", Some(body))
            .await
            .map(drop)
    }

    /// Replaces the host's tags.
    pub async fn set_tags(&self, tags: &BTreeMap<String, String>) -> Result<(), Error> {
        let body = serde_json::to_vec(tags).unwrap_or_default();
        self.send(reqwest::Method::POST, "/host/tags", Some(body))
            .await
            .map(drop)
    }

    /// `POST /storage/providers/default/volumes`: a new volume on this host.
    pub async fn create_volume(&self, req: &VolumeCreate) -> Result<Volume, Error> {
        let body = serde_json::to_vec(req).unwrap_or_default();
        self.json(
            reqwest::Method::POST,
            "/storage/providers/default/volumes",
            Some(body),
        )
        .await
    }

    /// Every volume on this host, oldest first.
    pub async fn list_volumes(&self) -> Result<Vec<Volume>, Error> {
        self.json(reqwest::Method::GET, "/storage/volumes", None)
            .await
    }

    /// 404 `object_not_found` for an unknown volume.
    pub async fn get_volume(&self, id: &str) -> Result<Volume, Error> {
        self.json(
            reqwest::Method::GET,
            &format!("/storage/volumes/{id}"),
            None,
        )
        .await
    }

    /// Deletes the volume and its data: 409 `conflict` while a starting or running job
    /// uses it, 404 `object_not_found` for an unknown one.
    pub async fn delete_volume(&self, id: &str) -> Result<(), Error> {
        self.send(
            reqwest::Method::DELETE,
            &format!("/storage/volumes/{id}"),
            None,
        )
        .await
        .map(drop)
    }

    /// `POST /attach` (spec §5.5): the job's output, signals to it and its exit status over
    /// an upgraded connection. A refused attach is the API error; a host that does not
    /// answer in 10 s is [`Error::TimedOut`].
    pub async fn attach(&self, req: &AttachRequest) -> Result<Attached, Error> {
        let body = serde_json::to_vec(req).map_err(|e| Error::Attach(e.to_string()))?;
        let answer = async {
            let resp = self
                .http
                .request(reqwest::Method::POST, "/attach")
                .header("content-type", "application/json")
                .header("connection", "upgrade")
                .header("upgrade", attach::PROTOCOL)
                .body(body)
                .send()
                .await
                .map_err(Error::Http)?;
            if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
                crate::json_http::check(resp).await?;
                return Err(Error::Attach("the host did not switch protocols".into()));
            }
            resp.upgrade().await.map_err(Error::Http)
        };
        let io = head(answer).await?;
        let (rd, wr) = tokio::io::split(io);
        Ok(Attached {
            rd,
            input: Some(AttachInput { wr }),
            buf: Vec::new(),
            ended: false,
        })
    }

    /// Job events (SSE) for one job (`Some(id)`) or all jobs. The stream ends when the
    /// connection does; the receiver then yields `None`. A host that does not answer in
    /// 10 s is [`Error::TimedOut`].
    pub async fn events(&self, job: Option<&str>) -> Result<mpsc::Receiver<Event>, Error> {
        let path = match job {
            Some(id) => format!("/host/jobs/{id}"),
            None => "/host/jobs".to_string(),
        };
        let answer = async {
            let resp = self
                .http
                .request(reqwest::Method::GET, &path)
                .header("accept", "text/event-stream")
                .send()
                .await
                .map_err(Error::Http)?;
            Ok(crate::json_http::check(resp).await?)
        };
        let resp = head(answer).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(read_events(resp, tx));
        Ok(rx)
    }
}

/// An attached job (see [`Client::attach`]).
pub struct Attached {
    rd: tokio::io::ReadHalf<reqwest::Upgraded>,
    /// `None` once taken by [`Attached::take_input`].
    input: Option<AttachInput>,
    buf: Vec<u8>,
    /// An exit status or an error frame came: the host may close after it.
    ended: bool,
}

impl Attached {
    /// The next frame from the host; `None` once the host closed the connection after
    /// the exit status or an error frame. A connection that ends before either (the
    /// daemon went away) is an error.
    pub async fn next(&mut self) -> Result<Option<Frame>, Error> {
        use tokio::io::AsyncReadExt;
        loop {
            match Frame::decode(&self.buf) {
                Ok(Some((f, n))) => {
                    self.buf.drain(..n);
                    if matches!(f, Frame::Exit(_) | Frame::Error(_)) {
                        self.ended = true;
                    }
                    return Ok(Some(f));
                }
                Ok(None) => {}
                Err(e) => return Err(Error::Attach(e.to_string())),
            }
            let mut chunk = [0u8; 8192];
            let n = self
                .rd
                .read(&mut chunk)
                .await
                .map_err(|e| Error::Attach(e.to_string()))?;
            if n == 0 {
                if !self.buf.is_empty() {
                    return Err(Error::Attach("connection closed inside a frame".into()));
                }
                if !self.ended {
                    return Err(Error::Attach(
                        "connection closed before the exit status".into(),
                    ));
                }
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a frame to the host (stdin data, a signal, a resize).
    pub async fn send(&mut self, f: &Frame) -> Result<(), Error> {
        match &mut self.input {
            Some(input) => input.send(f).await,
            None => Err(Error::Attach("the input side was taken".into())),
        }
    }

    /// The sending side, to write from another task while this one reads: a job that does
    /// not read its stdin holds the sender back, and its output must still be read.
    pub fn take_input(&mut self) -> Option<AttachInput> {
        self.input.take()
    }
}

/// The sending side of an [`Attached`] job.
pub struct AttachInput {
    wr: tokio::io::WriteHalf<reqwest::Upgraded>,
}

impl AttachInput {
    /// Writes `data` to the job's stdin (attached with the stdin flag); the host takes at
    /// most [`attach::MAX_PAYLOAD`] bytes a frame, so longer data goes in several.
    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), Error> {
        for chunk in data.chunks(attach::MAX_PAYLOAD) {
            self.send(&Frame::Data {
                stream: attach::STREAM_STDIN,
                data: chunk.to_vec(),
            })
            .await?;
        }
        Ok(())
    }

    /// Closes the job's stdin: it reads end-of-file after what was written.
    pub async fn close_stdin(&mut self) -> Result<(), Error> {
        self.send(&Frame::Data {
            stream: attach::STREAM_STDIN,
            data: Vec::new(),
        })
        .await
    }

    /// Sends a frame to the host.
    pub async fn send(&mut self, f: &Frame) -> Result<(), Error> {
        use tokio::io::AsyncWriteExt;
        let mut out = Vec::new();
        f.encode(&mut out);
        self.wr
            .write_all(&out)
            .await
            .map_err(|e| Error::Attach(e.to_string()))?;
        self.wr
            .flush()
            .await
            .map_err(|e| Error::Attach(e.to_string()))
    }
}

async fn read_events(mut r: reqwest::Response, tx: mpsc::Sender<Event>) {
    let mut buf = crate::sse::SseBuf::default();
    while let Ok(Some(chunk)) = r.chunk().await {
        if buf.push(&chunk).is_err() {
            tracing::debug!("host event stream item too long; ending the stream");
            return;
        }
        while let Some(item) = buf.next_item().map(decode_item) {
            match item {
                Item::End => return,
                Item::Event(ev) => {
                    if tx.send(*ev).await.is_err() {
                        return;
                    }
                }
                Item::Skip => {}
            }
        }
    }
}

enum Item {
    Event(Box<Event>),
    /// An `error` event: the stream ends.
    End,
    /// A keep-alive or an undecodable event.
    Skip,
}

/// Decodes one complete SSE item (ending in a blank line).
fn decode_item(raw: &[u8]) -> Item {
    let item = String::from_utf8_lossy(raw);
    if item.lines().any(|l| l.starts_with("event: error")) {
        return Item::End;
    }
    let data: String = item
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect::<Vec<_>>()
        .join("\n");
    if data.is_empty() {
        return Item::Skip;
    }
    match serde_json::from_str::<Event>(&data) {
        Ok(ev) => Item::Event(Box::new(ev)),
        Err(e) => {
            tracing::debug!(error = %e, "undecodable host event");
            Item::Skip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that accepts connections, reads nothing and never answers; counts them.
    async fn silent_host() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(s);
            }
        });
        (url, seen)
    }

    /// A host that accepted the connection and never answers: an event stream or an
    /// attach is given up after [`ANSWER_WAIT`] (they waited for ever). The clock is paused
    /// and advances by itself, real sockets included: a connection not completed at that
    /// instant can see its 2 s connect timeout pass early, and fail as `Http` sooner.
    #[tokio::test(start_paused = true)]
    async fn events_and_attach_from_a_host_that_never_answers_are_given_up() {
        let (url, seen) = silent_host().await;
        let c = Client::new(&url);
        let bounded = |what: &'static str, took: Duration, e: Error| {
            assert!(
                took <= ANSWER_WAIT + Duration::from_secs(1),
                "{what}: {took:?}"
            );
            match e {
                Error::TimedOut { after } => {
                    assert_eq!(after, ANSWER_WAIT);
                    assert!(took >= ANSWER_WAIT, "{what}: {took:?}");
                }
                Error::Http(_) => {}
                e => panic!("{what}: {e}"),
            }
        };
        let t0 = tokio::time::Instant::now();
        let events = tokio::time::timeout(Duration::from_secs(60), c.events(None)).await;
        let e = events.expect("events: no outcome in 60 s").err().unwrap();
        bounded("events", t0.elapsed(), e);
        let t0 = tokio::time::Instant::now();
        let req = AttachRequest {
            job_id: "j1".into(),
            ..Default::default()
        };
        let attached = tokio::time::timeout(Duration::from_secs(60), c.attach(&req)).await;
        let e = attached.expect("attach: no outcome in 60 s").err().unwrap();
        bounded("attach", t0.elapsed(), e);
        assert!(seen.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }

    #[test]
    fn a_decode_error_says_why() {
        let e = serde_json::from_str::<Job>("{").unwrap_err();
        let detail = e.to_string();
        let msg = Error::Decode(e).to_string();
        assert!(msg.contains(&detail), "{msg}");
    }

    #[test]
    fn sse_items_split_inside_a_character_decode_intact() {
        let mut ev = Event {
            event: EventKind::Error,
            job_id: "j1".into(),
            job: ActiveJob::default(),
        };
        ev.job.error = Some("échec: ünïcode".into());
        let wire = format!(
            "data: {}\n\n:\n\nevent: error\ndata: x\n\n",
            serde_json::to_string(&ev).unwrap()
        );
        let bytes = wire.as_bytes();
        // Split right after the first byte of the two-byte 'é'.
        let cut = wire.find('é').unwrap() + 1;
        let mut buf = crate::sse::SseBuf::default();
        buf.push(&bytes[..cut]).unwrap();
        assert!(buf.next_item().is_none());
        buf.push(&bytes[cut..]).unwrap();
        match buf.next_item().map(decode_item) {
            Some(Item::Event(got)) => assert_eq!(*got, ev),
            _ => panic!("no event"),
        }
        assert!(matches!(buf.next_item().map(decode_item), Some(Item::Skip)));
        assert!(matches!(buf.next_item().map(decode_item), Some(Item::End)));
        assert!(buf.next_item().is_none());
    }
}
