//! TLS session tickets come from clients: arbitrary bytes never open (a forgery would need
//! the key) and never panic; what we issue for any state opens to exactly that state.

#![no_main]

use std::sync::OnceLock;

use flynn_router::tickets::TicketKeys;
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static TicketKeys {
    static KEYS: OnceLock<TicketKeys> = OnceLock::new();
    KEYS.get_or_init(|| TicketKeys::random().expect("random ticket key"))
}

fuzz_target!(|data: &[u8]| {
    let k = keys();
    assert!(k.open(data).is_none(), "client bytes opened as a ticket");
    let t = k.issue(data).expect("a ticket");
    assert_eq!(k.open(&t).as_deref(), Some(data));
    // A ticket cut short or with bytes added does not open.
    assert!(k.open(&t[..t.len() - 1]).is_none());
    let mut longer = t.clone();
    longer.push(0);
    assert!(k.open(&longer).is_none());
});
