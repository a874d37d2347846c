//! Property tests of the frame-length check: whatever bytes a client
//! sends, cut into whatever chunks, the check never panics, and it refuses
//! exactly when a frame header announces more than the limit (a reference
//! model reads the whole stream at once).

use proptest::prelude::*;

use super::*;
use crate::prop_support::config;

fn body(max: usize) -> LimitedBody {
    LimitedBody {
        inner: Body::empty(),
        max,
        state: FrameState::header(),
    }
}

/// The reference: the announced lengths of the frames in `stream`, in
/// order, as far as headers are complete.
fn announced(stream: &[u8]) -> Vec<usize> {
    let mut lens = Vec::new();
    let mut at = 0;
    while at + 5 <= stream.len() {
        let len = u32::from_be_bytes([
            stream[at + 1],
            stream[at + 2],
            stream[at + 3],
            stream[at + 4],
        ]) as usize;
        lens.push(len);
        at += 5 + len;
    }
    lens
}

/// Frames whose lengths are mostly small (so a stream holds several),
/// sometimes over the limit (only their header is sent then: nothing of
/// the message is needed to refuse it).
fn stream(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let frame = (any::<u8>(), 0..=max + 2, any::<u8>()).prop_map(|(flag, len, fill)| {
        let mut f = vec![flag];
        f.extend_from_slice(&(len as u32).to_be_bytes());
        f.extend(std::iter::repeat_n(fill, len));
        f
    });
    let huge = (any::<u8>(), any::<u32>()).prop_map(|(flag, len)| {
        let mut f = vec![flag];
        f.extend_from_slice(&len.to_be_bytes());
        f
    });
    prop::collection::vec(prop_oneof![6 => frame, 1 => huge], 0..6)
        .prop_map(|frames| frames.concat())
}

/// `data` cut at the given points.
fn chunks(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    at.sort_unstable();
    at.push(data.len());
    let mut out = Vec::new();
    let mut from = 0;
    for to in at {
        out.push(data[from..to].to_vec());
        from = to;
    }
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_refused_exactly_when_a_frame_announces_too_much(
        max in 0usize..64,
        stream in (0usize..64).prop_flat_map(stream),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let over = announced(&stream).into_iter().find(|len| *len > max);
        let mut b = body(max);
        let mut refused = None;
        for c in chunks(&stream, &cuts) {
            if let Err(status) = b.check(&c) {
                refused = Some(status);
                break;
            }
        }
        match (over, refused) {
            (None, None) => {}
            (Some(len), Some(status)) => {
                prop_assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                prop_assert!(status.message().contains(&format!("{len} bytes")), "{:?}", status);
            }
            (over, refused) => prop_assert!(false, "model {:?}, check {:?}", over, refused),
        }
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(
        max in any::<usize>(),
        data in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut b = body(max);
        for c in chunks(&data, &cuts) {
            if b.check(&c).is_err() {
                break;
            }
        }
    }
}

/// The service behind the limit: answers with a marker, so a test sees
/// whether the request got through.
#[derive(Clone)]
struct Behind;

impl tower::Service<http::Request<Body>> for Behind {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<http::Response<Body>, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<Body>) -> Self::Future {
        let mut res = http::Response::new(Body::empty());
        res.headers_mut()
            .insert("x-behind", http::HeaderValue::from_static("1"));
        std::future::ready(Ok(res))
    }
}

fn header() -> impl Strategy<Value = (String, Vec<u8>)> {
    (
        "[a-z0-9-]{1,40}",
        prop_oneof![
            3 => prop::collection::vec(0x20u8..0x7f, 0..200),
            1 => prop::collection::vec(0x20u8..0x7f, 2000..9000),
        ],
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_metadata_is_refused_exactly_over_the_limit(
        headers in prop::collection::vec(header(), 0..8),
    ) {
        use tower::{Layer, Service};
        let mut req = http::Request::new(Body::empty());
        for (name, value) in &headers {
            req.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let total: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
        let mut svc = LimitLayer { max_message: 1024 }.layer(Behind);
        let res = futures_ready(svc.call(req));
        let passed = res.headers().contains_key("x-behind");
        prop_assert_eq!(passed, total <= MAX_METADATA, "{} bytes", total);
        if !passed {
            let status = Status::from_header_map(res.headers()).unwrap();
            prop_assert_eq!(status.code(), tonic::Code::ResourceExhausted);
            let said = format!("{total} bytes");
            prop_assert!(status.message().contains(&said), "{:?}", status);
        }
    }
}

/// The limit answers without waiting on anything: poll its future once.
fn futures_ready<F: std::future::Future<Output = Result<T, std::convert::Infallible>>, T>(
    fut: F,
) -> T {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(res)) => res,
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => panic!("the limit layer waited"),
    }
}
