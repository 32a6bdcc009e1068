//! Hot path: sans-IO HTTP/1.1 codec used by the router for every request.
//!
//! Bytes in, facts and bytes out: no sockets, no clock reads, no allocation beyond the
//! caller's reusable output `Vec`. The router (`flynn-router`) drives it; tests and the
//! fuzz target drive it with plain byte slices.
//!
//! INTERFACE CONTRACT (the router codes against exactly these items):
//! - `parse_request(buf) -> Result<Option<RequestInfo>, ParseError>`
//! - `write_request_head(buf, &RequestInfo, &Forward, &mut Vec<u8>)`
//! - `parse_response(buf, request_method) -> Result<Option<ResponseInfo>, ParseError>`
//! - `write_response_head(buf, &ResponseInfo, &ResponseOpts, &mut Vec<u8>)`
//! - `BodyReader::{new, advance, is_done}`
//! - `valid_request_id`, `format_uuid_v4`, `simple_response`

pub const MAX_HEAD: usize = 64 * 1024;
pub const MAX_HEADERS: usize = 128;
