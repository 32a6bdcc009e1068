//! Hot path: X-Request-Id acceptance and UUID v4 formatting (no allocation, no RNG: the
//! caller supplies the random bits).

/// Whether a client-supplied X-Request-Id is kept: 20..=200 bytes of `[a-zA-Z0-9+/=-]`.
pub fn valid_request_id(v: &[u8]) -> bool {
    (20..=200).contains(&v.len())
        && v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-'))
}

/// Formats `random` as a UUID v4: lowercase hex `8-4-4-4-12`, version nibble 4, variant `10xx`.
pub fn format_uuid_v4(random: u128, out: &mut [u8; 36]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let v = (random & !(0xF << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let mut nibble = 0;
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            *slot = b'-';
            continue;
        }
        *slot = HEX[((v >> (124 - 4 * nibble)) & 0xF) as usize];
        nibble += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_layout() {
        let mut out = [0u8; 36];
        format_uuid_v4(0, &mut out);
        assert_eq!(&out, b"00000000-0000-4000-8000-000000000000");
        format_uuid_v4(u128::MAX, &mut out);
        assert_eq!(&out, b"ffffffff-ffff-4fff-bfff-ffffffffffff");
        format_uuid_v4(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef, &mut out);
        assert_eq!(&out, b"01234567-89ab-4def-8123-456789abcdef");
    }

    #[test]
    fn uuid_is_a_valid_request_id() {
        let mut out = [0u8; 36];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..1000 {
            format_uuid_v4(rng.u128(..), &mut out);
            assert!(valid_request_id(&out));
            assert_eq!(out[14], b'4');
            assert!(matches!(out[19], b'8' | b'9' | b'a' | b'b'));
        }
    }
}
