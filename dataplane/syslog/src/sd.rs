//! Hot path: RFC 5424 STRUCTURED-DATA: validation, iteration and unescaping.
//!
//! `SD = NILVALUE / 1*SD-ELEMENT`, `SD-ELEMENT = "[" SD-ID *(SP PARAM-NAME "=" DQUOTE
//! PARAM-VALUE DQUOTE) "]"`. Inside a value, `\"`, `\\` and `\]` are escapes; a backslash
//! before any other byte is kept literally (RFC 5424 §6.3.3). Values are handed out raw
//! (escapes intact, zero-copy); [`unescape`] decodes one when needed.

/// Length of the structured data at the start of `s` (`-` or elements), or `None` when it
/// is malformed.
pub fn scan(s: &[u8]) -> Option<usize> {
    if s.first() == Some(&b'-') {
        return Some(1);
    }
    let mut i = 0;
    while s.get(i) == Some(&b'[') {
        i = element(s, i)?;
    }
    (i > 0).then_some(i)
}

fn is_name_byte(b: u8) -> bool {
    (33..=126).contains(&b) && b != b'=' && b != b']' && b != b'"'
}

/// Scans the name at `i` (1 to 32 name bytes); returns its end.
fn name(s: &[u8], i: usize) -> Option<usize> {
    let n = s.get(i..)?.iter().take_while(|&&b| is_name_byte(b)).count();
    (1..=32).contains(&n).then_some(i + n)
}

/// Scans one `[...]` element starting at `s[i] == '['`; returns the index after `]`.
fn element(s: &[u8], i: usize) -> Option<usize> {
    let mut i = name(s, i + 1)?;
    loop {
        match s.get(i)? {
            b']' => return Some(i + 1),
            b' ' => {
                i = name(s, i + 1)?;
                if s.get(i..i + 2)? != b"=\"" {
                    return None;
                }
                i = value_end(s, i + 2)?;
                i += 1; // closing quote
            }
            _ => return None,
        }
    }
}

/// Index of the closing quote of a value starting at `i`.
fn value_end(s: &[u8], mut i: usize) -> Option<usize> {
    loop {
        match s.get(i)? {
            b'"' => return Some(i),
            b'\\' => {
                i += if matches!(s.get(i + 1), Some(b'"' | b'\\' | b']')) {
                    2
                } else {
                    1
                }
            }
            _ => i += 1,
        }
    }
}

/// One SD-ELEMENT: its id and raw parameter list.
#[derive(Debug, Clone, Copy)]
pub struct Element<'a> {
    pub id: &'a [u8],
    params: &'a [u8],
}

impl<'a> Element<'a> {
    /// Parameters as `(name, raw value)` pairs; values keep their escapes.
    pub fn params(&self) -> Params<'a> {
        Params {
            s: self.params,
            i: 0,
        }
    }

    /// The raw value of the first parameter called `name`.
    pub fn param(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.params().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// Iterator over the elements of already validated structured data.
#[derive(Debug, Clone)]
pub struct Elements<'a> {
    s: &'a [u8],
    i: usize,
}

/// Iterates over validated structured data (`-` yields nothing).
pub fn elements(sd: &[u8]) -> Elements<'_> {
    Elements { s: sd, i: 0 }
}

impl<'a> Iterator for Elements<'a> {
    type Item = Element<'a>;
    fn next(&mut self) -> Option<Element<'a>> {
        if self.s.get(self.i) != Some(&b'[') {
            return None;
        }
        let id_start = self.i + 1;
        let id_end = name(self.s, id_start)?;
        let end = element(self.s, self.i)?;
        self.i = end;
        Some(Element {
            id: &self.s[id_start..id_end],
            params: &self.s[id_end..end - 1],
        })
    }
}

/// Iterator over `(name, raw value)` of one element.
#[derive(Debug, Clone)]
pub struct Params<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        if self.s.get(self.i) != Some(&b' ') {
            return None;
        }
        let n_start = self.i + 1;
        let n_end = name(self.s, n_start)?;
        let v_start = n_end + 2;
        let v_end = value_end(self.s, v_start)?;
        self.i = v_end + 1;
        Some((&self.s[n_start..n_end], &self.s[v_start..v_end]))
    }
}

/// Decodes a raw parameter value's escapes into `out` (appending).
pub fn unescape(raw: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && matches!(raw.get(i + 1), Some(b'"' | b'\\' | b']')) {
            out.push(raw[i + 1]);
            i += 2;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_table() {
        let cases: [(&[u8], Option<usize>); 14] = [
            (b"- msg", Some(1)),
            (b"[a]", Some(3)),
            (b"[flynn seq=\"12\"] hi", Some(16)),
            (b"[a x=\"1\" y=\"2\"][b]", Some(18)),
            (b"[a x=\"q\\\"uote\"]", Some(15)),
            (b"[a x=\"back\\\\\"]", Some(14)),
            (b"[a x=\"br\\]ack\"]", Some(15)),
            (b"[a x=\"lit\\n\"]", Some(13)),
            (b"[a x=\"open]", None),
            (b"[a x=1]", None),
            (b"[]", None),
            (b"[a ]", None),
            (b"x", None),
            (b"[a x=\"\"]", Some(8)),
        ];
        for (input, want) in cases {
            assert_eq!(scan(input), want, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn iterate_and_unescape() {
        let sd =
            b"[exampleSDID@32473 iut=\"3\" eventSource=\"App\\\"li\\]c\\\\\"][flynn seq=\"7\"]";
        assert_eq!(scan(sd), Some(sd.len()));
        let els: Vec<_> = elements(sd).collect();
        assert_eq!(els.len(), 2);
        assert_eq!(els[0].id, b"exampleSDID@32473");
        let params: Vec<_> = els[0].params().collect();
        assert_eq!(params[0], (&b"iut"[..], &b"3"[..]));
        let mut v = Vec::new();
        unescape(params[1].1, &mut v);
        assert_eq!(v, b"App\"li]c\\");
        assert_eq!(els[1].param(b"seq"), Some(&b"7"[..]));
        assert_eq!(elements(b"-").count(), 0);
    }
}
