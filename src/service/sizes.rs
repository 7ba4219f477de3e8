//! The size limits every call meets before anything else reads it: its
//! metadata (the HTTP/2 header list) and each message of its request body.
//! Both answer `RESOURCE_EXHAUSTED` with a `google.rpc.ErrorInfo` that says
//! the size and the limit (`METADATA_TOO_LARGE`, `MESSAGE_TOO_LARGE`), where
//! hyper would answer HTTP 431 (which clients report as `UNKNOWN`) and tonic
//! `OUT_OF_RANGE`.
//!
//! Metadata is measured as HTTP/2 measures a header list (name, value and 32
//! bytes a field, the request line's pseudo-headers included) and refused
//! here, before the gate authenticates anyone. HTTP/2 itself is told to take
//! header lists up to [`HTTP2_MAX_HEADER_LIST`], so that lists between our
//! limit and that one reach this layer and get a real status.
//!
//! A request body is not buffered: `LimitedBody` passes every chunk on as it
//! comes and reads only the 5-byte gRPC frame headers in it (which may be split
//! across DATA frames). A message whose declared length is over the limit ends
//! the body with a `Status`, which tonic's decoder answers the call with before
//! it reserves room for the message. tonic's own limit, set to the same value
//! on every service, stays behind it.

use crate::pb::ERROR_DOMAIN;
use http_body::{Body, Frame, SizeHint};
use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::Status;
use tonic::codegen::Bytes;
use tonic_types::{ErrorDetails, StatusExt};

/// The largest request message, in bytes (the 5-byte frame header not
/// counted): tonic's default, stated here so that our check and tonic's agree.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The largest request metadata, in bytes, counted as HTTP/2 counts a header
/// list. Well above what gRPC clients send (grpc-core's default limit on
/// metadata it receives is 8 KiB).
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// The header list size the server advertises to HTTP/2 peers
/// (`SETTINGS_MAX_HEADER_LIST_SIZE`). Lists up to this size are decoded and
/// reach [`MAX_METADATA_BYTES`]'s check; larger ones HTTP/2 refuses itself
/// (HTTP 431 and a reset stream), and h2 closes the connection (`GOAWAY`,
/// `ENHANCE_YOUR_CALM`) for a header block of more than a HEADERS frame and
/// six CONTINUATION frames as sent, or over four times this size decoded. A
/// call holds less than this much decoded metadata until it is refused, so
/// memory for headers stays below this times `--max-concurrent-streams` per
/// connection.
pub const HTTP2_MAX_HEADER_LIST: u32 = 64 * 1024;

/// Bytes HTTP/2 adds to each header field's name and value when it sizes a
/// header list (RFC 9113, section 6.5.2).
const FIELD_OVERHEAD: usize = 32;

/// A request's header list size as HTTP/2 counts it: every field's name and
/// value plus 32 bytes, the pseudo-headers (`:method`, `:scheme`,
/// `:authority`, `:path`) included.
pub(crate) fn metadata_size<B>(request: &http::Request<B>) -> usize {
    let uri = request.uri();
    let pseudo = [
        (":method", request.method().as_str().len()),
        (":scheme", uri.scheme_str().map_or(0, str::len)),
        (
            ":authority",
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path",
            uri.path_and_query().map_or(0, |p| p.as_str().len()),
        ),
    ];
    let pseudo: usize = pseudo
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|(name, len)| name.len() + len + FIELD_OVERHEAD)
        .sum();
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + FIELD_OVERHEAD)
        .sum();
    pseudo + fields
}

/// The answer to a call whose metadata is `size` bytes, over `limit`.
pub(crate) fn metadata_too_large(size: usize, limit: usize) -> Status {
    too_large(
        "METADATA_TOO_LARGE",
        format!(
            "the request metadata is {size} bytes, over the limit of {limit} bytes \
             (each header counts its name, its value and 32 bytes)"
        ),
        size,
        limit,
    )
}

/// The answer to a call with a message of `size` bytes, over `limit`.
pub(crate) fn message_too_large(size: usize, limit: usize) -> Status {
    too_large(
        "MESSAGE_TOO_LARGE",
        format!("the request message is {size} bytes, over the limit of {limit} bytes"),
        size,
        limit,
    )
}

fn too_large(reason: &str, message: String, size: usize, limit: usize) -> Status {
    let metadata = HashMap::from([
        ("size".to_owned(), size.to_string()),
        ("limit".to_owned(), limit.to_string()),
    ]);
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

/// The tower layer that puts the limits in front of every service (the gate
/// included).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SizeLayer {
    max_metadata: usize,
    max_message: usize,
}

impl SizeLayer {
    pub(crate) fn new(max_metadata: usize, max_message: usize) -> Self {
        SizeLayer {
            max_metadata,
            max_message,
        }
    }
}

impl Default for SizeLayer {
    fn default() -> Self {
        SizeLayer::new(MAX_METADATA_BYTES, MAX_MESSAGE_BYTES)
    }
}

impl<S> tower::Layer<S> for SizeLayer {
    type Service = SizeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SizeService {
            inner,
            limits: *self,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct SizeService<S> {
    inner: S,
    limits: SizeLayer,
}

impl<S, R> tower::Service<http::Request<tonic::body::Body>> for SizeService<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        futures::future::Ready<Result<http::Response<R>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let size = metadata_size(&request);
        if size > self.limits.max_metadata {
            tracing::debug!(
                path = %shorten_path(request.uri().path()),
                size,
                limit = self.limits.max_metadata,
                "request metadata over the limit"
            );
            let refusal = metadata_too_large(size, self.limits.max_metadata);
            return futures::future::Either::Right(futures::future::ready(Ok(refusal.into_http())));
        }
        let max_message = self.limits.max_message;
        let request =
            request.map(|body| tonic::body::Body::new(LimitedBody::new(body, max_message)));
        futures::future::Either::Left(self.inner.call(request))
    }
}

/// The start of a path, for a log line.
fn shorten_path(path: &str) -> &str {
    let mut end = path.len().min(200);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// Where [`LimitedBody`] is in the stream of gRPC frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    /// Reading a frame header: `got` of its 5 bytes so far.
    Header { bytes: [u8; 5], got: usize },
    /// Inside a message: `left` bytes of it still to come.
    Message { left: usize },
    /// A message over the limit was refused; nothing more is read.
    Refused,
}

/// A request body that refuses a gRPC message whose length prefix is over
/// `limit`, without holding any of the body: chunks pass through unchanged.
pub(crate) struct LimitedBody<B> {
    inner: B,
    limit: usize,
    scan: Scan,
}

impl<B> LimitedBody<B> {
    pub(crate) fn new(inner: B, limit: usize) -> Self {
        LimitedBody {
            inner,
            limit,
            scan: Scan::Header {
                bytes: [0; 5],
                got: 0,
            },
        }
    }

    /// Follows the frames through one chunk; the length of a message over the
    /// limit whose header it completes.
    fn scan(&mut self, mut chunk: &[u8]) -> Option<usize> {
        while !chunk.is_empty() {
            match &mut self.scan {
                Scan::Header { bytes, got } => {
                    let take = (bytes.len() - *got).min(chunk.len());
                    bytes[*got..*got + take].copy_from_slice(&chunk[..take]);
                    *got += take;
                    chunk = &chunk[take..];
                    if *got == bytes.len() {
                        let declared = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                        let len = usize::try_from(declared).unwrap_or(usize::MAX);
                        if len > self.limit {
                            self.scan = Scan::Refused;
                            return Some(len);
                        }
                        self.scan = Scan::Message { left: len };
                    }
                }
                Scan::Message { left } => {
                    let take = (*left).min(chunk.len());
                    *left -= take;
                    chunk = &chunk[take..];
                }
                Scan::Refused => return None,
            }
            if self.scan == (Scan::Message { left: 0 }) {
                self.scan = Scan::Header {
                    bytes: [0; 5],
                    got: 0,
                };
            }
        }
        None
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.scan == Scan::Refused {
            return Poll::Ready(None);
        }
        let frame = match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            None => return Poll::Ready(None),
            Some(Err(e)) => return Poll::Ready(Some(Err(Status::from_error(e.into())))),
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref()
            && let Some(len) = self.scan(data)
        {
            let limit = self.limit;
            return Poll::Ready(Some(Err(message_too_large(len, limit))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.scan == Scan::Refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.scan == Scan::Refused {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A body of the given chunks.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    /// A gRPC frame header declaring a message of `len` bytes.
    fn header(len: u32) -> Vec<u8> {
        let mut h = vec![0];
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    /// What the body yields for these chunks: the bytes passed on, and the
    /// error that ended it if one did.
    async fn drain(chunks: Vec<Vec<u8>>, limit: usize) -> (Vec<u8>, Option<Status>) {
        let mut body =
            LimitedBody::new(Chunks(chunks.into_iter().map(Bytes::from).collect()), limit);
        let mut passed = Vec::new();
        loop {
            match futures::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                None => return (passed, None),
                Some(Ok(frame)) => passed.extend_from_slice(&frame.into_data().unwrap()),
                Some(Err(status)) => {
                    let again =
                        futures::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
                    assert!(again.is_none(), "nothing after the refusal");
                    return (passed, Some(status));
                }
            }
        }
    }

    fn reason(status: &Status) -> (tonic::Code, String, HashMap<String, String>) {
        let info = status.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.domain, ERROR_DOMAIN);
        (status.code(), info.reason, info.metadata)
    }

    #[tokio::test]
    async fn messages_within_the_limit_pass_unchanged_however_they_are_split() {
        let mut stream = header(3);
        stream.extend_from_slice(b"abc");
        stream.extend_from_slice(&header(0));
        stream.extend_from_slice(&header(10));
        stream.extend_from_slice(&[7; 10]);
        // Every way of cutting the stream in two, and one byte a chunk.
        for cut in 0..=stream.len() {
            let chunks = vec![stream[..cut].to_vec(), stream[cut..].to_vec()];
            let (passed, refused) = drain(chunks, 10).await;
            assert!(refused.is_none(), "cut {cut}: {refused:?}");
            assert_eq!(passed, stream, "cut {cut}");
        }
        let bytes = stream.iter().map(|b| vec![*b]).collect();
        let (passed, refused) = drain(bytes, 10).await;
        assert!(refused.is_none(), "{refused:?}");
        assert_eq!(passed, stream);
    }

    #[tokio::test]
    async fn a_header_over_the_limit_ends_the_body_even_split_across_chunks() {
        let mut stream = header(2);
        stream.extend_from_slice(b"ok");
        let first = stream.len();
        stream.extend_from_slice(&header(11));
        stream.extend_from_slice(&[0; 11]);
        // The refusal comes with the chunk that completes the second header,
        // wherever the cuts fall; nothing of that chunk is passed on.
        for a in 0..=first + 5 {
            for b in a..=stream.len() {
                let chunks = vec![
                    stream[..a].to_vec(),
                    stream[a..b].to_vec(),
                    stream[b..].to_vec(),
                ];
                let (passed, refused) = drain(chunks, 10).await;
                let status = refused.unwrap_or_else(|| panic!("cuts {a}, {b}: refused"));
                let (code, why, metadata) = reason(&status);
                assert_eq!(code, tonic::Code::ResourceExhausted);
                assert_eq!(why, "MESSAGE_TOO_LARGE");
                assert_eq!(metadata["size"], "11");
                assert_eq!(metadata["limit"], "10");
                assert!(passed.len() < first + 5, "cuts {a}, {b}: {passed:?}");
                assert_eq!(passed, stream[..passed.len()], "passed on unchanged");
            }
        }
    }

    #[tokio::test]
    async fn the_largest_length_a_header_can_declare_is_refused() {
        let (_, refused) = drain(vec![header(u32::MAX)], MAX_MESSAGE_BYTES).await;
        let (_, why, metadata) = reason(&refused.expect("refused"));
        assert_eq!(why, "MESSAGE_TOO_LARGE");
        assert_eq!(metadata["size"], u32::MAX.to_string());
    }

    #[test]
    fn metadata_is_sized_as_http2_sizes_a_header_list() {
        let request = http::Request::builder()
            .method("POST")
            .uri("http://h:1/a.B/C")
            .header("te", "trailers")
            .header("x-big", "v".repeat(100))
            .body(())
            .unwrap();
        let expected = (7 + 4 + 32) // :method POST
            + (7 + 4 + 32) // :scheme http
            + (10 + 3 + 32) // :authority h:1
            + (5 + 6 + 32) // :path /a.B/C
            + (2 + 8 + 32) // te
            + (5 + 100 + 32); // x-big
        assert_eq!(metadata_size(&request), expected);
    }
}
