//! The retry layer's log events, in a test binary of their own: tracing caches which
//! callsites are enabled, and tests running at once on other threads with no subscriber
//! would disable these callsites for this test too.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use support::{ScriptServer, Step, client, request};
use tower::{Layer, ServiceExt};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::{RetryLayer, RetryPolicy};

fn no_delay_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .backoff(Backoff::constant(Duration::ZERO))
        .build()
        .unwrap()
}

/// Records the level and message of every event.
#[derive(Clone, Default)]
struct Events(Arc<std::sync::Mutex<Vec<(tracing::Level, String)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _context: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let level = *event.metadata().level();
        self.0.lock().unwrap().push((level, message.0));
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn logs_debug_per_retry_and_warn_on_failure() {
    use tracing_subscriber::layer::SubscriberExt;

    let events = Events::default();
    let subscriber = tracing_subscriber::registry().with(events.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = ScriptServer::start().await;
    server.script("/ok", [Step::status(200)]);
    server.script("/down", [Step::status(503)]);
    let retry = RetryLayer::new(no_delay_policy());

    retry
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/ok")))
        .await
        .unwrap();
    let ours = |events: &Events| {
        events
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, message)| message.contains("request"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(ours(&events), []);

    retry
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/down")))
        .await
        .unwrap();
    let logged = ours(&events);
    let expected = [
        (tracing::Level::DEBUG, "retrying request".to_owned()),
        (tracing::Level::DEBUG, "retrying request".to_owned()),
        (tracing::Level::DEBUG, "not retrying request".to_owned()),
        (
            tracing::Level::WARN,
            "request failed after retries".to_owned(),
        ),
    ];
    assert_eq!(logged, expected);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn nested_layer_warns_once() {
    use tracing_subscriber::layer::SubscriberExt;

    let events = Events::default();
    let subscriber = tracing_subscriber::registry().with(events.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = ScriptServer::start().await;
    server.script("/down", [Step::status(503)]);
    let inner = RetryLayer::new(no_delay_policy());
    let outer = RetryLayer::new(no_delay_policy());
    let client = outer.layer(inner.layer(client()));

    for _ in 0..2 {
        client
            .clone()
            .oneshot(request(Method::GET, &server.url("/down")))
            .await
            .unwrap();
    }

    let warnings: Vec<_> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, message)| message.contains("nested"))
        .cloned()
        .collect();
    let expected = "a RetryLayer is nested inside another RetryLayer; only the outer one retries";
    assert_eq!(warnings, [(tracing::Level::WARN, expected.to_owned())]);
    assert_eq!(server.hits("/down").len(), 6);
}
