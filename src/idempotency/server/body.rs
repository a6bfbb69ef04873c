use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

use crate::BoxError;

pin_project! {
    /// The response body of [`Idempotency`](super::Idempotency): a buffered body (a
    /// replay, a problem response or a response that was stored), or the inner service's
    /// body, possibly after frames that were read while trying to store it.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { data: Option<Bytes> },
        Inner { #[pin] body: B },
        // A body whose first frames were read while trying to store it.
        Resumed {
            read: VecDeque<Frame<Bytes>>,
            // The error that ended reading, sent after the frames in `read`.
            failure: Option<BoxError>,
            ended: bool,
            body: Pin<Box<B>>,
        },
    }
}

impl<B> ResponseBody<B> {
    pub(super) fn full(data: Bytes) -> Self {
        let data = (!data.is_empty()).then_some(data);
        ResponseBody {
            kind: Kind::Full { data },
        }
    }

    pub(super) fn inner(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner { body },
        }
    }

    fn resume(read: VecDeque<Frame<Bytes>>, failure: Option<BoxError>, body: Pin<Box<B>>) -> Self {
        ResponseBody {
            kind: Kind::Resumed {
                read,
                ended: failure.is_some(),
                failure,
                body,
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
            KindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Resumed {
                read,
                failure,
                ended,
                body,
            } => {
                if let Some(frame) = read.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(error) = failure.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                if *ended {
                    return Poll::Ready(None);
                }
                body.as_mut().poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Resumed {
                read,
                failure,
                ended,
                body,
            } => read.is_empty() && failure.is_none() && (*ended || body.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
            Kind::Inner { body } => body.size_hint(),
            Kind::Resumed {
                read, ended, body, ..
            } => {
                let read_bytes: u64 = read
                    .iter()
                    .filter_map(Frame::data_ref)
                    .map(|data| data.len() as u64)
                    .sum();
                if *ended {
                    // The body ends with an error, so its length is unknown. An exact hint
                    // makes hyper 1 send `Content-Length` and end the message after the
                    // read bytes, and the client takes the truncated body as complete.
                    let mut hint = SizeHint::new();
                    hint.set_lower(read_bytes);
                    return hint;
                }
                let rest = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(read_bytes));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(read_bytes));
                }
                hint
            }
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Full { .. } => "full",
            Kind::Inner { .. } => "inner",
            Kind::Resumed { .. } => "resumed",
        };
        f.debug_tuple("ResponseBody").field(&kind).finish()
    }
}

/// A response body read up to the replay size cap.
pub(super) enum Buffered<B> {
    /// The whole body, which fits the cap.
    Complete(Bytes),
    /// A body that exceeded the cap, had trailers or failed. It is not stored, and the
    /// caller gets the frames read so far followed by the rest.
    Partial(ResponseBody<B>),
}

/// Reads `body` until it ends or passes `max` bytes.
pub(super) async fn buffer_body<B>(body: B, max: usize) -> Buffered<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let mut read = VecDeque::new();
    let mut length = 0;
    loop {
        let frame = match body.frame().await {
            None => return Buffered::Complete(concat(read, length)),
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                return Buffered::Partial(ResponseBody::resume(read, Some(error.into()), body));
            }
        };

        let Some(data) = frame.data_ref() else {
            // Trailers cannot be stored.
            read.push_back(frame);
            return Buffered::Partial(ResponseBody::resume(read, None, body));
        };
        length += data.len();
        read.push_back(frame);
        if length > max {
            return Buffered::Partial(ResponseBody::resume(read, None, body));
        }
    }
}

fn concat(frames: VecDeque<Frame<Bytes>>, length: usize) -> Bytes {
    if frames.len() == 1 {
        if let Some(Ok(data)) = frames.into_iter().next().map(Frame::into_data) {
            return data;
        }
        return Bytes::new();
    }
    let mut buffer = BytesMut::with_capacity(length);
    for frame in frames {
        if let Ok(data) = frame.into_data() {
            buffer.extend_from_slice(&data);
        }
    }
    buffer.freeze()
}
