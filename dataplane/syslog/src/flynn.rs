//! Hot path: Flynn's conventions on top of RFC 5424 (spec §3.2).
//!
//! APP-NAME is the app id, HOSTNAME the host id, PROCID `<process_type>.<job_id>` (split on
//! the first `.`; without a dot the whole PROCID is the job id), MSGID names the stream and
//! the structured data carries the host's sequence number as `[flynn seq="N"]`.

use crate::message::Message;
use crate::sd;

/// Which output of a job a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
    Init,
    Unknown,
}

impl Stream {
    /// `ID1` stdout, `ID2` stderr, `ID3` init, anything else unknown.
    pub fn from_msgid(msgid: &[u8]) -> Stream {
        match msgid {
            b"ID1" => Stream::Stdout,
            b"ID2" => Stream::Stderr,
            b"ID3" => Stream::Init,
            _ => Stream::Unknown,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Init => "init",
            Stream::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Stream> {
        Some(match s {
            "stdout" => Stream::Stdout,
            "stderr" => Stream::Stderr,
            "init" => Stream::Init,
            "unknown" => Stream::Unknown,
            _ => return None,
        })
    }

    /// The MSGID Flynn's log muxer writes for this stream.
    pub const fn msgid(self) -> &'static str {
        match self {
            Stream::Stdout => "ID1",
            Stream::Stderr => "ID2",
            Stream::Init => "ID3",
            Stream::Unknown => "-",
        }
    }
}

/// Splits a PROCID into `(process_type, job_id)` on the first `.`.
pub fn split_procid(procid: &[u8]) -> (&[u8], &[u8]) {
    match procid.iter().position(|&b| b == b'.') {
        Some(i) => (&procid[..i], &procid[i + 1..]),
        None => (&[], procid),
    }
}

/// The `seq` parameter of a `[flynn seq="N"]` element, if present and numeric.
pub fn flynn_seq(structured_data: &[u8]) -> Option<u64> {
    let v = sd::elements(structured_data)
        .find(|e| e.id == b"flynn")?
        .param(b"seq")?;
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |a, &b| a * 10 + u64::from(b - b'0')))
}

impl Message {
    pub fn process_type(&self) -> &[u8] {
        split_procid(self.procid()).0
    }
    pub fn job_id(&self) -> &[u8] {
        split_procid(self.procid()).1
    }
    pub fn stream(&self) -> Stream {
        Stream::from_msgid(self.msgid())
    }
    pub fn flynn_seq(&self) -> Option<u64> {
        flynn_seq(self.structured_data())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn procid_table() {
        let cases: [(&[u8], &[u8], &[u8]); 5] = [
            (b"web.flynn-abcd1234", b"web", b"flynn-abcd1234"),
            (b".5", b"", b"5"),
            (b"5", b"", b"5"),
            (b"a.b.c", b"a", b"b.c"),
            (b"", b"", b""),
        ];
        for (p, t, j) in cases {
            assert_eq!(split_procid(p), (t, j));
        }
    }

    #[test]
    fn message_mapping() {
        let m = Message::parse(Bytes::from_static(
            b"<190>1 2009-11-10T23:00:00.123456Z host app web.flynn-abcd1234 ID1 [flynn seq=\"42\"] hi",
        ));
        assert_eq!(m.process_type(), b"web");
        assert_eq!(m.job_id(), b"flynn-abcd1234");
        assert_eq!(m.stream(), Stream::Stdout);
        assert_eq!(m.flynn_seq(), Some(42));
        for (id, s) in [
            ("ID1", "stdout"),
            ("ID2", "stderr"),
            ("ID3", "init"),
            ("ID4", "unknown"),
            ("-", "unknown"),
        ] {
            assert_eq!(Stream::from_msgid(id.as_bytes()).as_str(), s);
        }
        assert_eq!(flynn_seq(b"[flynn seq=\"x\"]"), None);
        assert_eq!(flynn_seq(b"[other seq=\"1\"]"), None);
    }
}
