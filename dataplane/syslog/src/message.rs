//! Hot path: RFC 5424 message parsing into spans of the frame (no copy, no allocation).
//!
//! `<PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG]`.
//! A frame that does not parse is still a [`Message`]: `raw` is set and the whole frame
//! is the body, so nothing a sender wrote is lost.

use bytes::Bytes;

use crate::sd;
use crate::timestamp::Timestamp;

/// Why a frame is not valid RFC 5424 (kept for counters; the message is kept as raw).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    Pri,
    Version,
    Timestamp,
    Hostname,
    AppName,
    ProcId,
    MsgId,
    StructuredData,
    /// The frame is larger than spans can address (64 KiB).
    TooLong,
}

impl ParseError {
    pub const fn as_str(self) -> &'static str {
        match self {
            ParseError::Pri => "pri",
            ParseError::Version => "version",
            ParseError::Timestamp => "timestamp",
            ParseError::Hostname => "hostname",
            ParseError::AppName => "app_name",
            ParseError::ProcId => "procid",
            ParseError::MsgId => "msgid",
            ParseError::StructuredData => "structured_data",
            ParseError::TooLong => "too_long",
        }
    }
}

/// A byte range of the frame (frames are at most 64 KiB, so `u16` offsets suffice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: u16,
    pub end: u16,
}

impl Span {
    fn new(start: usize, end: usize) -> Span {
        Span {
            start: start as u16,
            end: end as u16,
        }
    }
    #[inline]
    pub fn get(self, frame: &[u8]) -> &[u8] {
        frame
            .get(usize::from(self.start)..usize::from(self.end))
            .unwrap_or_default()
    }
    pub fn is_empty(self) -> bool {
        self.start >= self.end
    }
}

/// Where each field lies in the frame. NILVALUE (`-`) fields are empty spans; `ts` is
/// `None` for a NILVALUE timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fields {
    pub pri: u8,
    pub ts: Option<Timestamp>,
    pub hostname: Span,
    pub app_name: Span,
    pub procid: Span,
    pub msgid: Span,
    /// The structured data text (`[...]...`), empty for NILVALUE.
    pub sd: Span,
    pub msg: Span,
    /// True when the frame is not RFC 5424: only `msg` (the whole frame) is set.
    pub raw: bool,
}

impl Fields {
    /// Fields of a frame kept as a raw line.
    pub fn raw(len: usize) -> Fields {
        Fields {
            raw: true,
            msg: Span::new(0, len.min(usize::from(u16::MAX))),
            ..Fields::default()
        }
    }
}

/// Cursor over the frame for the header fields.
struct Cur<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cur<'_> {
    /// A space-free header field of 1..=max printable bytes, followed by SP.
    fn field(&mut self, max: usize, err: ParseError) -> Result<Span, ParseError> {
        let start = self.i;
        let n = self.s[start..]
            .iter()
            .take_while(|&&b| (33..=126).contains(&b))
            .count();
        if n == 0 || n > max || self.s.get(start + n) != Some(&b' ') {
            return Err(err);
        }
        self.i = start + n + 1;
        Ok(if n == 1 && self.s[start] == b'-' {
            Span::new(start, start)
        } else {
            Span::new(start, start + n)
        })
    }
}

/// Parses a frame's fields. Pure and allocation-free.
pub fn parse_fields(s: &[u8]) -> Result<Fields, ParseError> {
    if s.len() > usize::from(u16::MAX) {
        return Err(ParseError::TooLong);
    }
    // PRI: "<" 1*3DIGIT ">" with value 0..=191, no leading zeros.
    if s.first() != Some(&b'<') {
        return Err(ParseError::Pri);
    }
    let nd = s[1..]
        .iter()
        .take(4)
        .take_while(|b| b.is_ascii_digit())
        .count();
    if nd == 0 || nd > 3 || s.get(1 + nd) != Some(&b'>') || (nd > 1 && s[1] == b'0') {
        return Err(ParseError::Pri);
    }
    let pri = s[1..1 + nd]
        .iter()
        .fold(0u32, |a, &b| a * 10 + u32::from(b - b'0'));
    if pri > 191 {
        return Err(ParseError::Pri);
    }
    let mut c = Cur { s, i: 2 + nd };
    // VERSION: NONZERO-DIGIT 0*2DIGIT; only 1 is defined.
    if s.get(c.i..c.i + 2) != Some(b"1 ") {
        return Err(ParseError::Version);
    }
    c.i += 2;
    let ts_span = c.field(64, ParseError::Timestamp)?;
    let ts = if ts_span.is_empty() {
        None
    } else {
        Some(Timestamp::parse(ts_span.get(s)).ok_or(ParseError::Timestamp)?)
    };
    let hostname = c.field(255, ParseError::Hostname)?;
    let app_name = c.field(48, ParseError::AppName)?;
    let procid = c.field(128, ParseError::ProcId)?;
    let msgid = c.field(32, ParseError::MsgId)?;
    let sd_len = sd::scan(&s[c.i..]).ok_or(ParseError::StructuredData)?;
    let sd_span = if sd_len == 1 && s[c.i] == b'-' {
        Span::new(c.i, c.i)
    } else {
        Span::new(c.i, c.i + sd_len)
    };
    let mut i = c.i + sd_len;
    let msg = match s.get(i) {
        None => Span::new(i, i),
        Some(b' ') => {
            i += 1;
            if s[i..].starts_with(b"\xEF\xBB\xBF") {
                i += 3;
            }
            Span::new(i, s.len())
        }
        Some(_) => return Err(ParseError::StructuredData),
    };
    Ok(Fields {
        pri: pri as u8,
        ts,
        hostname,
        app_name,
        procid,
        msgid,
        sd: sd_span,
        msg,
        raw: false,
    })
}

/// A parsed message: the frame it came from plus where each field is. Field accessors
/// return slices of the frame (`&[u8]`, or `Bytes` sharing the frame's allocation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    frame: Bytes,
    fields: Fields,
}

impl Message {
    /// Parses `frame`; a frame that is not RFC 5424 becomes a raw message.
    pub fn parse(frame: Bytes) -> Message {
        let fields = parse_fields(&frame).unwrap_or_else(|_| Fields::raw(frame.len()));
        Message { frame, fields }
    }

    /// Parses `frame`, also reporting why it was kept raw.
    pub fn parse_checked(frame: Bytes) -> (Message, Option<ParseError>) {
        match parse_fields(&frame) {
            Ok(fields) => (Message { frame, fields }, None),
            Err(e) => {
                let fields = Fields::raw(frame.len());
                (Message { frame, fields }, Some(e))
            }
        }
    }

    /// Reassembles a message from a frame and fields computed earlier for it.
    pub fn from_parts(frame: Bytes, fields: Fields) -> Message {
        Message { frame, fields }
    }

    pub fn frame(&self) -> &Bytes {
        &self.frame
    }
    pub fn fields(&self) -> &Fields {
        &self.fields
    }
    pub fn is_raw(&self) -> bool {
        self.fields.raw
    }
    pub fn pri(&self) -> u8 {
        self.fields.pri
    }
    pub fn facility(&self) -> u8 {
        self.fields.pri >> 3
    }
    pub fn severity(&self) -> u8 {
        self.fields.pri & 7
    }
    pub fn timestamp(&self) -> Option<Timestamp> {
        self.fields.ts
    }
    pub fn hostname(&self) -> &[u8] {
        self.fields.hostname.get(&self.frame)
    }
    pub fn app_name(&self) -> &[u8] {
        self.fields.app_name.get(&self.frame)
    }
    pub fn procid(&self) -> &[u8] {
        self.fields.procid.get(&self.frame)
    }
    pub fn msgid(&self) -> &[u8] {
        self.fields.msgid.get(&self.frame)
    }
    /// The structured data text, empty for NILVALUE.
    pub fn structured_data(&self) -> &[u8] {
        self.fields.sd.get(&self.frame)
    }
    pub fn msg(&self) -> &[u8] {
        self.fields.msg.get(&self.frame)
    }
    /// A field as `Bytes` sharing the frame (a reference count, no copy).
    pub fn slice(&self, span: Span) -> Bytes {
        let (a, b) = (usize::from(span.start), usize::from(span.end));
        if a >= b || b > self.frame.len() {
            return Bytes::new();
        }
        self.frame.slice(a..b)
    }
    pub fn msg_bytes(&self) -> Bytes {
        self.slice(self.fields.msg)
    }
    pub fn app_name_bytes(&self) -> Bytes {
        self.slice(self.fields.app_name)
    }
    /// The SD elements (validated during parsing).
    pub fn sd_elements(&self) -> sd::Elements<'_> {
        sd::elements(self.structured_data())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Message {
        Message::parse(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn field_table() {
        type Row<'a> = (
            &'a str,
            Option<(
                &'a str,
                &'a str,
                &'a str,
                &'a str,
                &'a str,
                &'a str,
                &'a str,
            )>,
        );
        // input → (ts, host, app, procid, msgid, sd, msg), None = raw
        let rows: Vec<Row> = vec![
            (
                "<190>1 2009-11-10T23:00:00.123456Z host1 app1 web.flynn-abcd1234 ID1 [flynn seq=\"3\"] hello world",
                Some(("2009-11-10T23:00:00.123456Z", "host1", "app1", "web.flynn-abcd1234", "ID1", "[flynn seq=\"3\"]", "hello world")),
            ),
            ("<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - 'su root' failed",
                Some(("2003-10-11T22:14:15.003Z", "mymachine.example.com", "su", "", "ID47", "", "'su root' failed"))),
            ("<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time",
                Some(("2003-08-24T12:14:15.000003Z", "192.0.2.1", "myproc", "8710", "", "", "%% It's time"))),
            ("<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"] \u{feff}An application event",
                Some(("2003-10-11T22:14:15.003Z", "mymachine.example.com", "evntslog", "", "ID47", "[exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"]", "An application event"))),
            ("<165>1 2003-10-11T22:14:15.003Z h a - ID47 [a x=\"q\\\"\\\\\\]\"][b]",
                Some(("2003-10-11T22:14:15.003Z", "h", "a", "", "ID47", "[a x=\"q\\\"\\\\\\]\"][b]", ""))),
            // Times i64 nanoseconds cannot hold are clamped, not a reason to go raw.
            ("<190>1 2300-01-01T00:00:00Z h app1 web.1 ID1 [flynn seq=\"1\"] future",
                Some(("2262-04-11T23:47:16.854775807Z", "h", "app1", "web.1", "ID1", "[flynn seq=\"1\"]", "future"))),
            ("<190>1 0001-01-01T00:00:00Z h app1 web.1 ID1 [flynn seq=\"2\"] past",
                Some(("1677-09-21T00:12:43.145224192Z", "h", "app1", "web.1", "ID1", "[flynn seq=\"2\"]", "past"))),
            ("<0>1 - - - - - -", Some(("", "", "", "", "", "", ""))),
            ("<0>1 - - - - - - ", Some(("", "", "", "", "", "", ""))),
            ("<191>1 - h a p m - line\nwith newline", Some(("", "h", "a", "p", "m", "", "line\nwith newline"))),
            ("<192>1 - - - - - -", None),
            ("<01>1 - - - - - -", None),
            ("<1>2 - - - - - -", None),
            ("<1>1 2009-11-10 h a p m - x", None),
            ("<1>1 - h a p m [bad", None),
            ("<1>1 - h a p m -x", None),
            ("<1>1 - h  a p m - x", None),
            ("<1>1 - h a p", None),
            ("hello, not syslog", None),
            ("<13>Oct 11 22:14:15 mymachine su: 'su root' failed", None),
            ("", None),
        ];
        let ts_of = |m: &Message| m.timestamp().map(|t| t.to_rfc3339()).unwrap_or_default();
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        for (input, want) in rows {
            let m = p(input);
            match want {
                Some((ts, host, app, procid, msgid, sd, msg)) => {
                    assert!(!m.is_raw(), "{input}");
                    assert_eq!(ts_of(&m), ts, "{input}");
                    assert_eq!(s(m.hostname()), host, "{input}");
                    assert_eq!(s(m.app_name()), app, "{input}");
                    assert_eq!(s(m.procid()), procid, "{input}");
                    assert_eq!(s(m.msgid()), msgid, "{input}");
                    assert_eq!(s(m.structured_data()), sd, "{input}");
                    assert_eq!(s(m.msg()), msg, "{input}");
                }
                None => {
                    assert!(m.is_raw(), "{input}");
                    assert_eq!(m.msg(), input.as_bytes());
                }
            }
        }
    }

    #[test]
    fn fields_share_the_frame() {
        let m = p("<1>1 - h app1 p m - body");
        let app = m.app_name_bytes();
        assert_eq!(&app[..], b"app1");
        let base = m.frame().as_ptr() as usize;
        assert!((app.as_ptr() as usize) > base && (app.as_ptr() as usize) < base + m.frame().len());
    }

    #[test]
    fn pri_parts() {
        let m = p("<190>1 - - - - - -");
        assert_eq!((m.facility(), m.severity()), (23, 6));
        let (_, e) = Message::parse_checked(Bytes::from_static(b"<1>1 bad - - - - -"));
        assert_eq!(e, Some(ParseError::Timestamp));
    }
}
