//! `IdempotencyLayer` over `PostgresStore` on a real axum server on 127.0.0.1, called over
//! HTTP/1.1 by a hyper client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, LINK, RETRY_AFTER};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower_safe_retry::IdempotencyLayer;
use tower_safe_retry::idempotency::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};

use crate::support;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Received {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

async fn post_charge(client: &HttpClient, address: SocketAddr, key: &str) -> Received {
    let request = Request::post(format!("http://{address}/charges"))
        .header(IDEMPOTENCY_KEY, key)
        .body(Full::new(Bytes::from_static(b"{\"amount\":100}")))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Received {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// What the charge handler returns, and how often it ran.
struct Charges {
    calls: AtomicUsize,
    status: StatusCode,
    /// How long the handler waits, so that duplicates arrive while it runs.
    delay: Duration,
}

/// Counts the call, waits, and returns a binary body that names the call, with two
/// `Link` headers.
async fn charge(State(charges): State<Arc<Charges>>) -> Response<axum::body::Body> {
    let call = charges.calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(charges.delay).await;
    let mut body: Vec<u8> = (0..=255u8).rev().collect();
    body.extend_from_slice(format!("call {call}").as_bytes());
    Response::builder()
        .status(charges.status)
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(LINK, "</charges/1>; rel=self")
        .header(LINK, "</charges>; rel=collection")
        .body(axum::body::Body::from(body))
        .unwrap()
}

fn charges_app(charges: &Arc<Charges>, table: &support::TestTable) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .with_state(Arc::clone(charges))
        .layer(IdempotencyLayer::new(table.store.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_run_once() {
    const REQUESTS: usize = 200;
    let Some(table) = support::table("server_race").await else {
        return;
    };
    let charges = Arc::new(Charges {
        calls: AtomicUsize::new(0),
        status: StatusCode::CREATED,
        delay: Duration::from_millis(500),
    });
    let address = serve(charges_app(&charges, &table)).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let barrier = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let mut tasks = Vec::new();
    for _ in 0..REQUESTS {
        let client = client.clone();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            post_charge(&client, address, "same-key").await
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }

    assert_eq!(charges.calls.load(Ordering::SeqCst), 1);
    let successes: Vec<&Received> = results.iter().filter(|r| r.status.is_success()).collect();
    let conflicts: Vec<&Received> = results
        .iter()
        .filter(|r| r.status == StatusCode::CONFLICT)
        .collect();
    assert_eq!(successes.len() + conflicts.len(), REQUESTS);
    assert!(!successes.is_empty());
    for conflict in &conflicts {
        assert!(conflict.headers.contains_key(RETRY_AFTER));
    }
    let first = successes
        .iter()
        .find(|r| !r.headers.contains_key(IDEMPOTENT_REPLAYED))
        .expect("one response is the first execution");
    for success in &successes {
        assert_eq!(success.status, StatusCode::CREATED);
        assert_eq!(success.body, first.body);
        let links: Vec<_> = success.headers.get_all(LINK).iter().collect();
        assert_eq!(
            links,
            ["</charges/1>; rel=self", "</charges>; rel=collection"]
        );
    }

    // Once the handler finished, a retry gets the stored response.
    let replay = post_charge(&client, address, "same-key").await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.headers[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(charges.calls.load(Ordering::SeqCst), 1);
    eprintln!(
        "{REQUESTS} duplicates: {} got 201, {} got 409",
        successes.len(),
        conflicts.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_releases_key() {
    let Some(table) = support::table("server_release").await else {
        return;
    };
    let charges = Arc::new(Charges {
        calls: AtomicUsize::new(0),
        status: StatusCode::SERVICE_UNAVAILABLE,
        delay: Duration::ZERO,
    });
    let address = serve(charges_app(&charges, &table)).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let first = post_charge(&client, address, "k").await;
    let second = post_charge(&client, address, "k").await;

    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!second.headers.contains_key(IDEMPOTENT_REPLAYED));
    assert_eq!(charges.calls.load(Ordering::SeqCst), 2);
    assert_eq!(table.count().await, 0);
}
