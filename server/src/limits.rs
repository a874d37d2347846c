//! Request limits answered the way gRPC clients expect: with a gRPC status.
//!
//! tonic refuses a message over its decoding limit with OUT_OF_RANGE, and
//! h2 answers oversized headers with a bare HTTP 431 or a GOAWAY that also
//! kills the other calls on the connection. This layer sits in front of the
//! services and answers first:
//! - a message whose gRPC frame says it is longer than `max_message` ends
//!   the call with RESOURCE_EXHAUSTED (read from the 5-byte frame header as
//!   the body streams in, so nothing of it is buffered);
//! - request metadata over [`MAX_METADATA`] is answered with
//!   RESOURCE_EXHAUSTED before any service runs, and the connection lives on
//!   (h2 itself is given a far larger limit, see `server.rs`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::Frame;
use tonic::body::Body;
use tonic::Status;

/// The most request metadata (header names and values) a call may carry.
pub const MAX_METADATA: usize = 16 * 1024;

#[derive(Clone)]
pub struct LimitLayer {
    pub max_message: usize,
}

impl<S> tower::Layer<S> for LimitLayer {
    type Service = Limit<S>;
    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            max_message: self.max_message,
        }
    }
}

#[derive(Clone)]
pub struct Limit<S> {
    inner: S,
    max_message: usize,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ResBody> tower::Service<http::Request<Body>> for Limit<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let metadata: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        if metadata > MAX_METADATA {
            let status = Status::resource_exhausted(format!(
                "the request metadata is {metadata} bytes, over the limit of {MAX_METADATA}; send fewer or smaller headers"
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let max = self.max_message;
        let req = req.map(|body| {
            Body::new(LimitedBody {
                inner: body,
                max,
                state: FrameState::header(),
            })
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(Body::new))
        })
    }
}

/// Where a request body is in its stream of gRPC frames.
enum FrameState {
    /// Collecting the 5-byte frame header (flag, length): the bytes so
    /// far, and how many there are.
    Header([u8; 5], usize),
    /// Inside a frame's message; this many bytes remain.
    Message(usize),
}

impl FrameState {
    fn header() -> FrameState {
        FrameState::Header([0; 5], 0)
    }
}

struct LimitedBody {
    inner: Body,
    max: usize,
    state: FrameState,
}

impl LimitedBody {
    /// Follows the frame headers in `data`; refuses a frame that announces
    /// a message over the limit.
    fn check(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            match &mut self.state {
                FrameState::Header(header, have) => {
                    let take = (5 - *have).min(data.len());
                    header[*have..*have + take].copy_from_slice(&data[..take]);
                    *have += take;
                    data.advance(take);
                    if *have == 5 {
                        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]])
                            as usize;
                        if len > self.max {
                            return Err(Status::resource_exhausted(format!(
                                "the request message is {len} bytes, over the server's limit of {} bytes; \
                                 the largest requests carry a secret, limited by the server's --max-secret-size: \
                                 store a smaller value or raise the limit (at most 3 MiB)",
                                self.max
                            )));
                        }
                        self.state = FrameState::Message(len);
                    }
                }
                FrameState::Message(left) => {
                    let take = (*left).min(data.len());
                    *left -= take;
                    data.advance(take);
                    if *left == 0 {
                        self.state = FrameState::header();
                    }
                }
            }
        }
        // A frame of length 0 leaves Message(0) behind: the next bytes
        // pass through that arm, which takes none of them and expects the
        // next header.
        Ok(())
    }
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let data = data.clone();
                if let Err(status) = self.check(&data) {
                    return Poll::Ready(Some(Err(status)));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(max: usize) -> LimitedBody {
        LimitedBody {
            inner: Body::empty(),
            max,
            state: FrameState::header(),
        }
    }

    fn frame(len: u32) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&len.to_be_bytes());
        f.extend(std::iter::repeat_n(1u8, len as usize));
        f
    }

    #[test]
    fn frames_within_the_limit_pass_in_any_chunking() {
        let mut stream = frame(10);
        stream.extend(frame(0));
        stream.extend(frame(100));
        for chunk in [1, 3, 5, 7, 1000] {
            let mut b = body(100);
            for c in stream.chunks(chunk) {
                b.check(c).unwrap();
            }
        }
    }

    #[test]
    fn an_announced_length_over_the_limit_is_resource_exhausted() {
        let mut b = body(100);
        b.check(&frame(5)).unwrap();
        // Only the header has arrived: that is enough to refuse.
        let err = b.check(&frame(101)[..5]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("101 bytes"), "{err:?}");
    }

    #[test]
    fn a_header_after_an_empty_message_is_still_read() {
        let mut b = body(100);
        // The empty message's header ends the chunk.
        b.check(&frame(0)).unwrap();
        let err = b.check(&frame(101)[..5]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }
}

#[cfg(test)]
mod prop_tests;
