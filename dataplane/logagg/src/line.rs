//! Hot path: a buffered log line (one owned copy of its frame) and its JSON rendering.

use bytes::Bytes;
use flynn_syslog::{Fields, Message, Stream, Timestamp};

/// Messages whose app cannot be known (not RFC 5424, or APP-NAME is NILVALUE) are kept
/// under this channel id.
pub const UNROUTED_APP: &str = "_unrouted";

/// Fixed per-line bookkeeping counted against the memory cap besides the frame bytes.
pub const LINE_OVERHEAD: usize = 160;

/// One buffered line: a private copy of the frame (so no read buffer stays pinned) with
/// the field spans found at ingest.
#[derive(Debug, Clone)]
pub struct Line {
    /// Per-app insertion sequence number (stitches history to live reads).
    pub seq: u64,
    /// The message timestamp, or the receive time when it had none.
    pub ts: Timestamp,
    pub msg: Message,
}

impl Line {
    pub fn new(seq: u64, ts: Timestamp, frame: &[u8], fields: &Fields) -> Line {
        Line {
            seq,
            ts,
            msg: Message::from_parts(Bytes::copy_from_slice(frame), *fields),
        }
    }

    /// [`content_hash`] of this line.
    pub fn hash(&self) -> u64 {
        content_hash(self.ts, self.msg.frame(), self.msg.fields())
    }

    pub fn cost(&self) -> usize {
        self.msg.frame().len() + LINE_OVERHEAD
    }

    /// Same content as `frame`/`fields` at the same time (replay dedupe, spec §3.3).
    pub fn same_as(&self, ts: Timestamp, frame: &[u8], fields: &Fields) -> bool {
        let m = &self.msg;
        self.ts == ts
            && m.is_raw() == fields.raw
            && m.hostname() == fields.hostname.get(frame)
            && m.procid() == fields.procid.get(frame)
            && m.msgid() == fields.msgid.get(frame)
            && m.structured_data() == fields.sd.get(frame)
            && m.msg() == fields.msg.get(frame)
    }
}

/// FxHash-style word hasher: fast for the short keys and lines seen here. Inputs come
/// from cluster hosts, not the open internet, so HashDoS resistance is not needed.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl std::hash::Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            h = (h.rotate_left(5) ^ w).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        let r = chunks.remainder();
        tail[..r.len()].copy_from_slice(r);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(tail) ^ (bytes.len() as u64)).wrapping_mul(K);
        self.0 = h;
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(K);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FastBuild = std::hash::BuildHasherDefault<FastHasher>;

/// Content hash used for dedupe: time, host, procid, msgid (the stream: a stdout and a
/// stderr line with the same text and time are two lines), structured data and body.
pub fn content_hash(ts: Timestamp, frame: &[u8], f: &Fields) -> u64 {
    use std::hash::Hasher;
    let mut h = FastHasher::default();
    h.write_u64(ts.0 as u64);
    h.write(f.hostname.get(frame));
    h.write(f.procid.get(frame));
    h.write(f.msgid.get(frame));
    h.write(f.sd.get(frame));
    h.write(f.msg.get(frame));
    h.finish()
}

/// Which lines a reader wants (spec §3.4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub job_id: Option<String>,
    /// `Some("")` selects lines without a process type.
    pub process_type: Option<String>,
    /// Bit per [`Stream`]; `None` means all.
    pub streams: Option<u8>,
}

pub fn stream_bit(s: Stream) -> u8 {
    match s {
        Stream::Stdout => 1,
        Stream::Stderr => 2,
        Stream::Init => 4,
        Stream::Unknown => 8,
    }
}

impl Filter {
    pub fn matches(&self, m: &Message) -> bool {
        if let Some(j) = &self.job_id {
            if m.job_id() != j.as_bytes() {
                return false;
            }
        }
        if let Some(p) = &self.process_type {
            if m.process_type() != p.as_bytes() {
                return false;
            }
        }
        if let Some(mask) = self.streams {
            if mask & stream_bit(m.stream()) == 0 {
                return false;
            }
        }
        true
    }

    pub fn is_all(&self) -> bool {
        self.job_id.is_none() && self.process_type.is_none() && self.streams.is_none()
    }
}

/// Appends `s` as a JSON string (invalid UTF-8 replaced by U+FFFD).
pub fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    let text = String::from_utf8_lossy(s);
    out.push(b'"');
    for c in text.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let v = c as u32;
                let hex = b"0123456789abcdef";
                out.extend_from_slice(b"\\u");
                for shift in [12, 8, 4, 0] {
                    out.push(hex[((v >> shift) & 0xf) as usize]);
                }
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// Appends the line as one JSON object in spec §3.6's key order (empty fields omitted):
/// `{"host_id","job_id","msg","process_type","raw"?,"source","stream","timestamp"}`.
pub fn write_json(out: &mut Vec<u8>, line: &Line) {
    let m = &line.msg;
    out.push(b'{');
    let field = |out: &mut Vec<u8>, key: &str, v: &[u8], first: &mut bool| {
        if v.is_empty() {
            return;
        }
        if !*first {
            out.push(b',');
        }
        *first = false;
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        json_str(out, v);
    };
    let mut first = true;
    field(out, "host_id", m.hostname(), &mut first);
    field(out, "job_id", m.job_id(), &mut first);
    field(out, "msg", m.msg(), &mut first);
    field(out, "process_type", m.process_type(), &mut first);
    if m.is_raw() {
        if !first {
            out.push(b',');
        }
        out.extend_from_slice(b"\"raw\":true");
        first = false;
    }
    field(out, "source", b"app", &mut first);
    let stream = if m.is_raw() { "" } else { m.stream().as_str() };
    field(out, "stream", stream.as_bytes(), &mut first);
    // Written in place: RFC 3339 text needs no JSON escaping, and is never empty.
    if !first {
        out.push(b',');
    }
    out.extend_from_slice(b"\"timestamp\":\"");
    line.ts.write_rfc3339(out);
    out.extend_from_slice(b"\"}");
}

/// The marker a follower gets when it fell behind and `n` lines were skipped.
pub fn write_skip_marker(out: &mut Vec<u8>, n: u64) {
    use std::io::Write;
    // (Writing to a `Vec` cannot fail.)
    let _ = write!(
        out,
        "{{\"msg\":\"logagg: reader too slow, {n} lines skipped\",\"skipped\":{n}"
    );
    out.extend_from_slice(b",\"source\":\"logagg\",\"timestamp\":\"");
    Timestamp::now().write_rfc3339(out);
    out.extend_from_slice(b"\"}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use flynn_syslog::parse_fields;

    fn line(s: &str) -> Line {
        let f = parse_fields(s.as_bytes()).unwrap_or_else(|_| Fields::raw(s.len()));
        let ts = f.ts.unwrap_or(Timestamp(0));
        Line::new(1, ts, s.as_bytes(), &f)
    }

    #[test]
    fn json_key_order_and_format() {
        let l = line("<190>1 2009-11-10T23:00:00.123456Z host app web.flynn-abcd1234 ID1 [flynn seq=\"1\"] hi \"there\"\u{1}");
        let mut out = Vec::new();
        write_json(&mut out, &l);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"host_id":"host","job_id":"flynn-abcd1234","msg":"hi \"there\"\u0001","process_type":"web","source":"app","stream":"stdout","timestamp":"2009-11-10T23:00:00.123456Z"}"#
        );
        let l = line("<190>1 2009-11-10T23:00:00Z host app .5 ID2 - x");
        let mut out = Vec::new();
        write_json(&mut out, &l);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"host_id":"host","job_id":"5","msg":"x","source":"app","stream":"stderr","timestamp":"2009-11-10T23:00:00Z"}"#
        );
        let l = line("not syslog \u{ff}");
        let mut out = Vec::new();
        write_json(&mut out, &l);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["raw"], true);
        assert_eq!(v["msg"], "not syslog \u{ff}");
    }

    #[test]
    fn skip_marker_format() {
        let mut out = Vec::new();
        write_skip_marker(&mut out, 42);
        let text = String::from_utf8(out).unwrap();
        let head = r#"{"msg":"logagg: reader too slow, 42 lines skipped","skipped":42,"source":"logagg","timestamp":""#;
        assert!(text.starts_with(head), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{text}");
    }

    #[test]
    fn filters() {
        let web = line("<190>1 2009-11-10T23:00:00Z h a web.1 ID1 - x");
        let none = line("<190>1 2009-11-10T23:00:00Z h a .5 ID2 - x");
        let f = Filter {
            process_type: Some(String::new()),
            ..Filter::default()
        };
        assert!(!f.matches(&web.msg) && f.matches(&none.msg));
        let f = Filter {
            job_id: Some("1".into()),
            ..Filter::default()
        };
        assert!(f.matches(&web.msg) && !f.matches(&none.msg));
        let f = Filter {
            streams: Some(stream_bit(Stream::Stderr)),
            ..Filter::default()
        };
        assert!(!f.matches(&web.msg) && f.matches(&none.msg));
    }
}
