//! The bytes of a server-sent-events stream, split into items (each ends in a blank line).
//! Bytes, not text, until an item is complete: a chunk may end inside a UTF-8 character.
//! A search resumes where the last one stopped and taken items are not shifted out one by
//! one, so an item arriving in many small chunks, or many items in one large chunk, cost
//! linear time.

/// Largest item kept while incomplete: a server that never ends one is cut off instead of
/// growing the buffer without bound.
pub const MAX_ITEM: usize = 16 << 20;

#[derive(Debug, Default)]
pub struct SseBuf {
    buf: Vec<u8>,
    /// Where the next item starts.
    start: usize,
    /// Bytes from `start` up to here hold no `\n\n`.
    scanned: usize,
}

/// An incomplete item grew past [`MAX_ITEM`].
#[derive(Debug, PartialEq, Eq)]
pub struct TooLong;

impl SseBuf {
    /// Appends a chunk of the stream.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), TooLong> {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            // Taken items go in one move, once they are at least half the buffer.
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.start + chunk.len() > MAX_ITEM {
            return Err(TooLong);
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// The next complete item (with its blank line), if one has arrived.
    pub fn next_item(&mut self) -> Option<&[u8]> {
        // A `\n\n` may straddle the end of the last search.
        let from = self.scanned.saturating_sub(1).max(self.start);
        match self.buf[from..].windows(2).position(|w| w == b"\n\n") {
            Some(i) => {
                let end = from + i + 2;
                let item = self.start..end;
                self.start = end;
                self.scanned = end;
                Some(&self.buf[item])
            }
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Bytes held (taken items not yet dropped included).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(b: &mut SseBuf) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(i) = b.next_item() {
            out.push(String::from_utf8_lossy(i).into_owned());
        }
        out
    }

    #[test]
    fn items_come_whole_however_the_stream_is_cut() {
        let wire = "data: {\"k\":\"d\u{e9}j\u{e0} vu\"}\n\n:\n\nevent: error\ndata: x\n\n";
        let want = [
            "data: {\"k\":\"d\u{e9}j\u{e0} vu\"}\n\n",
            ":\n\n",
            "event: error\ndata: x\n\n",
        ];
        let bytes = wire.as_bytes();
        // Every split into two chunks, and byte by byte.
        for cut in 0..=bytes.len() {
            let mut b = SseBuf::default();
            b.push(&bytes[..cut]).unwrap();
            let mut got = items(&mut b);
            b.push(&bytes[cut..]).unwrap();
            got.extend(items(&mut b));
            assert_eq!(got, want, "cut at {cut}");
        }
        let mut b = SseBuf::default();
        let mut got = Vec::new();
        for byte in bytes {
            b.push(std::slice::from_ref(byte)).unwrap();
            got.extend(items(&mut b));
        }
        assert_eq!(got, want);
    }

    #[test]
    fn taken_items_are_dropped_and_an_endless_item_is_cut_off() {
        let mut b = SseBuf::default();
        for i in 0..10_000 {
            b.push(format!("data: {i}\n\n").as_bytes()).unwrap();
            assert_eq!(items(&mut b), [format!("data: {i}\n\n")]);
        }
        assert!(
            b.held() < 64,
            "{} bytes held after every item was taken",
            b.held()
        );
        let chunk = vec![b'x'; 1 << 20];
        let mut pushed = 0;
        let err = loop {
            match b.push(&chunk) {
                Ok(()) => pushed += chunk.len(),
                Err(e) => break e,
            }
            assert!(b.next_item().is_none());
        };
        assert_eq!(err, TooLong);
        assert!(pushed <= MAX_ITEM && pushed + chunk.len() > MAX_ITEM);
    }
}
