//! [`ReplayBody`]: a request body that can be sent again.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::BoxError;

/// A request body that forwards the frames of the caller's body to the first attempt as
/// they arrive, and keeps their bytes (as `Bytes` handles, not copies) so that later
/// attempts send the identical bytes and trailers.
///
/// The bytes kept are capped. A body that grows past the cap is still sent in full by the
/// attempt that reads it, but its kept bytes are dropped at once and the request can no
/// longer be replayed. A body announced (by `Content-Length` or its size hint) to be over
/// the cap is not kept at all.
///
/// A replay sends the kept frames first. When the first attempt ended before reading the
/// whole body (a server may respond before it has read the request), the replay reads the
/// rest from the caller's body, keeping it too.
pub struct ReplayBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    /// A body sent once, without keeping anything.
    Once(B),
    /// A body whose frames are kept in `shared`; `position` is the next kept frame this
    /// copy sends.
    Kept {
        shared: Arc<Mutex<Shared<B>>>,
        position: usize,
        /// The caller's body, while this copy reads from it.
        source: Option<B>,
        trailers_sent: bool,
    },
}

struct Shared<B> {
    /// The size hint of the caller's body, which every copy reports so that each attempt
    /// is framed alike (`Content-Length` or chunked).
    hint: SizeHint,
    chunks: Vec<Bytes>,
    kept_len: usize,
    cap: usize,
    trailers: Option<HeaderMap>,
    /// The caller's body, when no copy is reading from it.
    source: Option<B>,
    /// The caller's body has ended, so the kept frames are the whole body.
    ended: bool,
    /// The body grew past the cap or failed, so it cannot be replayed.
    unreplayable: bool,
}

impl<B: Body> ReplayBody<B> {
    /// Wraps `body` for sending once, keeping nothing.
    pub(crate) fn once(body: B) -> Self {
        ReplayBody {
            kind: Kind::Once(body),
        }
    }

    /// Wraps `body`, keeping up to `cap` bytes of it for later attempts.
    pub(crate) fn kept(body: B, cap: usize) -> Self {
        let shared = Shared {
            hint: body.size_hint(),
            chunks: Vec::new(),
            kept_len: 0,
            cap,
            trailers: None,
            source: None,
            ended: body.is_end_stream(),
            unreplayable: false,
        };
        ReplayBody {
            kind: Kind::Kept {
                shared: Arc::new(Mutex::new(shared)),
                position: 0,
                source: Some(body),
                trailers_sent: false,
            },
        }
    }

    /// Returns a handle on the kept frames that sends nothing itself; later attempts are made
    /// from it with [`replay`](Self::replay).
    pub(crate) fn handle(&self) -> Self {
        match &self.kind {
            Kind::Once(_) => unreachable!("a body sent once has no handle"),
            Kind::Kept { shared, .. } => ReplayBody {
                kind: Kind::Kept {
                    shared: Arc::clone(shared),
                    position: 0,
                    source: None,
                    trailers_sent: false,
                },
            },
        }
    }

    /// Returns a copy for another attempt, or `None` when the body grew past the cap, failed,
    /// or is still being read by an earlier attempt.
    pub(crate) fn replay(&self) -> Option<Self> {
        let Kind::Kept { shared, .. } = &self.kind else {
            return None;
        };
        let state = lock(shared);
        // The source is either finished or parked in `shared`. A copy that still has it
        // is sending it, and two copies cannot read one body.
        let available = state.ended || state.source.is_some();
        if state.unreplayable || !available {
            return None;
        }
        drop(state);

        Some(ReplayBody {
            kind: Kind::Kept {
                shared: Arc::clone(shared),
                position: 0,
                source: None,
                trailers_sent: false,
            },
        })
    }

    /// Returns whether the body can no longer be replayed because it grew past the cap.
    pub(crate) fn is_unreplayable(&self) -> bool {
        match &self.kind {
            Kind::Once(_) => true,
            Kind::Kept { shared, .. } => lock(shared).unreplayable,
        }
    }
}

fn lock<B>(shared: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    // A panic while the lock was held leaves whole chunks in the buffer, so the state is
    // still consistent.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<B> Body for ReplayBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Kind::Kept {
            shared,
            position,
            source,
            trailers_sent,
        } = &mut this.kind
        else {
            let Kind::Once(body) = &mut this.kind else {
                unreachable!()
            };
            return poll_once(Pin::new(body), cx);
        };

        let mut state = lock(shared);
        if *position < state.chunks.len() {
            let chunk = state.chunks[*position].clone();
            *position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if state.ended {
            if !*trailers_sent && let Some(trailers) = state.trailers.clone() {
                *trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }

        if source.is_none() {
            *source = state.source.take();
        }
        let Some(body) = source.as_mut() else {
            state.unreplayable = true;
            return Poll::Ready(Some(Err("request body is still being read by an earlier \
                                         attempt"
                .into())));
        };
        // Reading the source under the lock keeps the kept frames in order. Only one copy
        // reads at a time, so only size and end-of-stream checks contend for the lock.
        let frame = match Pin::new(body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };

        match frame {
            None => {
                state.ended = true;
                *source = None;
                if !*trailers_sent && let Some(trailers) = state.trailers.clone() {
                    *trailers_sent = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Poll::Ready(None)
            }
            Some(Err(error)) => {
                state.unreplayable = true;
                state.chunks = Vec::new();
                Poll::Ready(Some(Err(error.into())))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let chunk = data.copy_to_bytes(data.remaining());
                    keep_chunk(&mut state, position, &chunk);
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        state.trailers = Some(trailers.clone());
                        *trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    // A frame that is neither data nor trailers: forward nothing of it.
                    Err(_) => Poll::Ready(Some(Err("unknown body frame".into()))),
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Once(body) => body.is_end_stream(),
            Kind::Kept {
                shared,
                position,
                trailers_sent,
                ..
            } => {
                let state = lock(shared);
                state.ended
                    && *position >= state.chunks.len()
                    && (state.trailers.is_none() || *trailers_sent)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Once(body) => body.size_hint(),
            Kind::Kept { shared, .. } => lock(shared).hint,
        }
    }
}

/// Keeps a chunk read from the source, or gives up keeping once the cap is passed.
fn keep_chunk<B>(state: &mut Shared<B>, position: &mut usize, chunk: &Bytes) {
    if state.unreplayable {
        return;
    }
    if state.kept_len + chunk.len() > state.cap {
        state.unreplayable = true;
        state.chunks = Vec::new();
        state.kept_len = 0;
        *position = 0;
        return;
    }
    state.kept_len += chunk.len();
    state.chunks.push(chunk.clone());
    *position = state.chunks.len();
}

fn poll_once<B>(
    body: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match body.poll_frame(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(None) => Poll::Ready(None),
        Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
        Poll::Ready(Some(Ok(frame))) => {
            let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
            Poll::Ready(Some(Ok(frame)))
        }
    }
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        // Park the source so that a later copy can read the rest of it.
        if let Kind::Kept { shared, source, .. } = &mut self.kind
            && let Some(body) = source.take()
        {
            lock(shared).source = Some(body);
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Once(_) => f.debug_struct("ReplayBody").field("kept", &false).finish(),
            Kind::Kept { position, .. } => f
                .debug_struct("ReplayBody")
                .field("kept", &true)
                .field("position", position)
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures_util::stream;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Chunks = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    fn chunks(sizes: &[usize]) -> Chunks {
        let frames: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(index, size)| Ok(Frame::data(Bytes::from(vec![index as u8; *size]))))
            .collect();
        StreamBody::new(stream::iter(frames))
    }

    fn kept_len<B>(body: &ReplayBody<B>) -> usize {
        let Kind::Kept { shared, .. } = &body.kind else {
            panic!("not a kept body");
        };
        let state = lock(shared);
        state.chunks.iter().map(Bytes::len).sum()
    }

    #[tokio::test]
    async fn kept_bytes_never_exceed_cap() {
        let mut body = ReplayBody::kept(chunks(&[40; 10]), 100);
        let handle = body.handle();
        let mut sent = 0;
        while let Some(frame) = body.frame().await {
            sent += frame.unwrap().into_data().unwrap().len();
            assert!(kept_len(&handle) <= 100, "{}", kept_len(&handle));
        }

        assert_eq!(sent, 400);
        assert_eq!(kept_len(&handle), 0);
        assert!(handle.is_unreplayable());
        assert!(handle.replay().is_none());
    }

    #[tokio::test]
    async fn replay_reads_the_rest_of_an_unfinished_body() {
        let mut first = ReplayBody::kept(chunks(&[3, 4, 5]), 100);
        let handle = first.handle();
        let chunk = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(chunk.len(), 3);
        // The first attempt ended after one chunk, as when a server responds early.
        drop(first);

        let replay = handle.replay().expect("the source is parked");
        let collected = replay.collect().await.unwrap().to_bytes();
        assert_eq!(collected.len(), 12);
        assert_eq!(&collected[..3], &[0, 0, 0]);
        assert_eq!(&collected[3..7], &[1, 1, 1, 1]);
        assert_eq!(&collected[7..], &[2, 2, 2, 2, 2]);

        let again = handle.replay().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(again, collected);
    }

    #[tokio::test]
    async fn replay_refused_while_source_held() {
        let mut first = ReplayBody::kept(chunks(&[3, 4]), 100);
        let handle = first.handle();
        first.frame().await.unwrap().unwrap();
        // `first` still has the source and has not finished it.
        assert!(handle.replay().is_none());
        assert!(!handle.is_unreplayable());
    }

    #[tokio::test]
    async fn once_body_is_forwarded_unchanged() {
        let body = ReplayBody::once(chunks(&[2, 2]));
        assert!(body.is_unreplayable());
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], &[0, 0, 1, 1]);
    }
}
