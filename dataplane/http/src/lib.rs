//! Hot path: sans-IO HTTP/1.1 codec used by the router (`flynn-router`) for every proxied request.
//!
//! Bytes in, facts and bytes out: it parses and validates request and response heads
//! ([`parse_request`], [`parse_response`]), rewrites them for the other side
//! ([`write_request_head`], [`write_response_head`], spec §1.6), tracks where bodies end
//! while their bytes are forwarded verbatim ([`BodyReader`]) and writes the router's own
//! small responses ([`simple_response`]). It does no I/O, reads no clock, logs nothing and
//! allocates nothing except by appending to the caller's reusable output `Vec`; sockets,
//! timeouts, routing and retries are the router's. Tests and the fuzz target (`fuzz/`) drive
//! it with plain byte slices.
//!
//! INTERFACE CONTRACT (the router codes against exactly these items):
//! - `parse_request(buf) -> Result<Option<RequestInfo>, ParseError>`
//! - `write_request_head(buf, &RequestInfo, &Forward, &mut Vec<u8>)`
//! - `parse_response(buf, request_method) -> Result<Option<ResponseInfo>, ParseError>`
//! - `write_response_head(buf, &ResponseInfo, &ResponseOpts, &mut Vec<u8>)`
//! - `BodyReader::{new, advance, is_done}`
//! - `valid_request_id`, `format_uuid_v4`, `simple_response`, `reason`

mod body;
mod dechunk;
mod fields;
mod forward;
mod head;
mod proxy_protocol;
mod request;
mod request_id;
mod respond;
mod response;

pub use body::{Advance, BodyError, BodyReader, MAX_CHUNK_LINE, MAX_CHUNK_SIZE, MAX_TRAILERS};
pub use dechunk::Dechunker;
pub use forward::{write_request_head, Forward};
pub use head::{Framing, Method, ParseError, Span, MAX_HEAD, MAX_HEADERS};
pub use proxy_protocol::{
    cookie_value, header_values, parse_proxy, ProxyError, ProxyHeader, V2_SIGNATURE,
};
pub use request::{parse_request, RequestInfo};
pub use request_id::{format_uuid_v4, valid_request_id};
pub use respond::{reason, simple_response, typed_response};
pub use response::{parse_response, write_response_head, ResponseInfo, ResponseOpts};
