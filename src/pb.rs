//! The code generated from `proto/` by `build.rs`: messages, the
//! `tether.v1.ConnectionService` client and server, and the descriptor set
//! served by reflection; and the codec they use, which is prost's with one
//! change: a request that does not decode is the client's error; and the
//! names of gRPC's status codes as its spec spells them.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod tether {
    pub mod v1 {
        tonic::include_proto!("tether.v1");
    }
}

/// Descriptors of `tether.v1` and the `google.rpc` error types it returns, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tether_descriptor");

/// The `ErrorInfo.domain` of every error Tether returns.
pub const ERROR_DOMAIN: &str = "tether.dev";

/// prost's codec, except that a message that does not decode (bytes cut
/// short, invalid UTF-8, nesting past prost's recursion limit) is
/// `INVALID_ARGUMENT`: the request is malformed, the server is fine. prost's
/// own codec calls it `INTERNAL`.
#[derive(Debug, Default)]
pub struct StrictCodec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> tonic::codec::Codec for StrictCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(self.0.decoder())
    }
}

/// The decoder of [`StrictCodec`].
#[derive(Debug)]
pub struct StrictDecoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: prost::Message + Default> tonic::codec::Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<U>, tonic::Status> {
        use tonic_types::{ErrorDetails, StatusExt};
        self.0.decode(buf).map_err(|status| {
            let why = format!("the message does not decode: {}", status.message());
            let mut details = ErrorDetails::with_error_info(
                "INVALID_ARGUMENT",
                ERROR_DOMAIN,
                [("field".to_string(), "request".to_string())],
            );
            details.add_bad_request_violation("request", why.clone());
            tonic::Status::with_error_details(tonic::Code::InvalidArgument, why, details)
        })
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

/// A code as the gRPC spec spells it: `FAILED_PRECONDITION`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
