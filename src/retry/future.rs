use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};
use tower_service::Service;

use super::attempt::{Attempt, Setup, calling_inner};
use super::plan::{Retrying, finish, plan_retry, take_last};
use super::{AttemptTimeout, DeadlineExceeded, Replay, RetryEvent, RetryPolicy, SuppressReason};
use crate::BoxError;
use crate::classify::{Classify, Decision, RetryReason};
use crate::idempotency::LogicalRequest;
use crate::metrics::AttemptObserver;

pin_project! {
    /// The response future of [`Retry`](super::Retry).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, Req, C, R>
    where
        R: Replay<Req>,
        S: Service<R::Attempt>,
    {
        #[pin]
        state: State<S::Future>,
        // One timer per logical request, reset for each use: the per-attempt timeout or
        // the deadline while an attempt is in flight, the backoff while sleeping, the
        // deadline while waiting for readiness.
        #[pin]
        timer: Option<Sleep>,
        timer_armed: bool,
        service: S,
        policy: Arc<RetryPolicy<C, R>>,
        // What later attempts are made from.
        source: Option<R::Source>,
        // Boxed and made on the first retry, so a request that succeeds at once is small.
        retrying: Option<Box<Retrying<R::Attempt, S::Response>>>,
        attempts: u32,
        max_attempts: u32,
        idempotent: bool,
        mark: Option<LogicalRequest>,
        deadline: Option<Instant>,
        attempt_started: Option<Instant>,
        observer: Option<AttemptObserver>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] future: F },
        Sleeping,
        Ready,
        Done,
    }
}

impl<S, Req, C, R> ResponseFuture<S, Req, C, R>
where
    R: Replay<Req>,
    S: Service<R::Attempt>,
{
    pub(super) fn new(
        future: S::Future,
        service: S,
        policy: Arc<RetryPolicy<C, R>>,
        setup: Setup,
        source: Option<R::Source>,
    ) -> Self {
        let now = (policy.deadline.is_some()
            || policy.attempt_timeout.is_some()
            || setup.observer.is_some())
        .then(Instant::now);
        let deadline = now.zip(policy.deadline).map(|(now, limit)| now + limit);
        let attempt_end = attempt_end(now, policy.attempt_timeout, deadline);

        ResponseFuture {
            state: State::Called { future },
            timer: attempt_end.map(sleep_until),
            timer_armed: attempt_end.is_some(),
            service,
            policy,
            source,
            retrying: None,
            attempts: 1,
            max_attempts: setup.max_attempts,
            idempotent: setup.idempotent,
            mark: setup.mark,
            deadline,
            attempt_started: setup.observer.as_ref().and(now),
            observer: setup.observer,
        }
    }
}

/// When the attempt starting at `now` must end: its timeout or the deadline, if sooner.
fn attempt_end(
    now: Option<Instant>,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
) -> Option<Instant> {
    let timeout_end = now.zip(timeout).map(|(now, timeout)| now + timeout);
    match (timeout_end, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Arms the shared timer for `at`, creating it on first use.
fn arm(mut timer: Pin<&mut Option<Sleep>>, armed: &mut bool, at: Instant) {
    match timer.as_mut().as_pin_mut() {
        Some(sleep) => sleep.reset(at),
        None => timer.set(Some(sleep_until(at))),
    }
    *armed = true;
}

/// Polls the timer if it is armed; `Pending` when it is not armed or has not fired.
fn poll_timer(timer: Pin<&mut Option<Sleep>>, armed: &mut bool, cx: &mut Context<'_>) -> Poll<()> {
    if !*armed {
        return Poll::Pending;
    }
    let Some(sleep) = timer.as_pin_mut() else {
        return Poll::Pending;
    };
    ready!(sleep.poll(cx));
    *armed = false;
    Poll::Ready(())
}

impl<S, Req, C, R> Future for ResponseFuture<S, Req, C, R>
where
    R: Replay<Req>,
    S: Service<R::Attempt>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let outcome = match future.poll(cx) {
                        Poll::Ready(result) => result.map_err(Into::into),
                        Poll::Pending => {
                            ready!(poll_timer(this.timer.as_mut(), this.timer_armed, cx));
                            let now = Instant::now();
                            if this.deadline.is_some_and(|deadline| now >= deadline) {
                                this.state.set(State::Done);
                                if let (Some(observer), Some(started)) =
                                    (&*this.observer, *this.attempt_started)
                                {
                                    let decision = Decision::fail(RetryReason::Timeout);
                                    observer.attempt(decision, started.elapsed());
                                    observer.suppressed(SuppressReason::Deadline);
                                }
                                let deadline = this.policy.deadline.unwrap_or_default();
                                tracing::warn!(
                                    attempts = *this.attempts,
                                    ?deadline,
                                    "request deadline exceeded during an attempt"
                                );
                                return Poll::Ready(Err(DeadlineExceeded { deadline }.into()));
                            }
                            let timeout = this.policy.attempt_timeout.unwrap_or_default();
                            Err(AttemptTimeout { timeout }.into())
                        }
                    };
                    this.state.set(State::Done);
                    *this.timer_armed = false;

                    let decision = this.policy.classifier.classify(outcome.as_ref());
                    if let (Some(observer), Some(started)) =
                        (&*this.observer, *this.attempt_started)
                    {
                        observer.attempt(decision, started.elapsed());
                    }
                    if !matches!(decision, Decision::Retry { .. }) {
                        // Only a retried request has anything to log here.
                        if *this.attempts > 1 {
                            finish(decision, None, *this.attempts, this.observer);
                        }
                        return Poll::Ready(outcome);
                    }

                    // A key added below this layer makes the request idempotent too.
                    let idempotent =
                        *this.idempotent || this.mark.as_ref().is_some_and(LogicalRequest::has_key);
                    let plan = plan_retry(
                        decision,
                        this.policy,
                        *this.attempts,
                        *this.max_attempts,
                        idempotent,
                        this.source.as_ref(),
                        *this.deadline,
                        this.retrying,
                    );
                    let (delay, source, retrying) = match plan {
                        Ok(plan) => plan,
                        Err(suppressed) => {
                            finish(decision, suppressed, *this.attempts, this.observer);
                            return Poll::Ready(outcome);
                        }
                    };
                    retrying.previous_delay = delay;
                    retrying.last = Some(outcome);

                    let reason = decision.reason().map_or("none", |reason| reason.as_str());
                    tracing::debug!(attempt = *this.attempts, reason, ?delay, "retrying request");
                    if let (Some(on_retry), Some(reason)) =
                        (&this.policy.on_retry, decision.reason())
                    {
                        on_retry(&RetryEvent {
                            attempt: *this.attempts,
                            reason,
                            delay,
                        });
                    }
                    if let Some(observer) = this.observer {
                        observer.backoff(delay, source);
                    }

                    if delay.is_zero() {
                        // A zero delay skips the timer, which would round it up to a tick.
                        if let Some(deadline) = *this.deadline {
                            arm(this.timer.as_mut(), this.timer_armed, deadline);
                        }
                        this.state.set(State::Ready);
                    } else {
                        let wake = Instant::now() + delay;
                        arm(this.timer.as_mut(), this.timer_armed, wake);
                        this.state.set(State::Sleeping);
                    }
                }
                StateProj::Sleeping => {
                    ready!(poll_timer(this.timer.as_mut(), this.timer_armed, cx));
                    if let Some(deadline) = *this.deadline {
                        arm(this.timer.as_mut(), this.timer_armed, deadline);
                    }
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    match this.service.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                        Poll::Pending => {
                            ready!(poll_timer(this.timer.as_mut(), this.timer_armed, cx));
                            tracing::warn!(
                                attempts = *this.attempts,
                                "request deadline passed while waiting for the service to be ready"
                            );
                            if let Some(observer) = this.observer {
                                observer.suppressed(SuppressReason::Deadline);
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(take_last(this.retrying));
                        }
                    }

                    let mut request = this
                        .retrying
                        .as_mut()
                        .and_then(|retrying| retrying.next.take())
                        .expect("the ready state is only entered with a planned attempt");
                    *this.attempts += 1;
                    this.policy.stamp(&mut request, *this.attempts);
                    if let Some(extensions) =
                        this.policy.replay.attempt_extensions_mut(&mut request)
                    {
                        extensions.insert(Attempt::new(*this.attempts));
                    }

                    let now = (this.deadline.is_some()
                        || this.policy.attempt_timeout.is_some()
                        || this.observer.is_some())
                    .then(Instant::now);
                    *this.attempt_started = this.observer.as_ref().and(now);
                    *this.timer_armed = false;
                    if let Some(end) = attempt_end(now, this.policy.attempt_timeout, *this.deadline)
                    {
                        arm(this.timer.as_mut(), this.timer_armed, end);
                    }

                    let future = calling_inner(|| this.service.call(request));
                    this.state.set(State::Called { future });
                }
                StateProj::Done => panic!("retry ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S, Req, C, R> fmt::Debug for ResponseFuture<S, Req, C, R>
where
    R: Replay<Req>,
    S: Service<R::Attempt>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.attempts)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}
