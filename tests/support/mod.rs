//! A scripted HTTP server on 127.0.0.1 for the client-side tests.
//!
//! Each path responds from its own script of steps, in order; the last step repeats. Every
//! request that reaches the server is recorded.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What the server does with one request.
#[derive(Clone, Debug)]
pub enum Step {
    /// Waits `delay`, then responds.
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        delay: Duration,
    },
    /// Reads the request, then closes the connection without a response.
    Reset,
}

impl Step {
    pub fn status(status: u16) -> Self {
        Step::Respond {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        if let Step::Respond { headers, .. } = &mut self {
            headers.push((name, value.into()));
        }
        self
    }

    pub fn delay(mut self, by: Duration) -> Self {
        if let Step::Respond { delay, .. } = &mut self {
            *delay = by;
        }
        self
    }
}

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Hit {
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

#[derive(Default)]
struct State {
    scripts: Mutex<HashMap<String, VecDeque<Step>>>,
    hits: Mutex<HashMap<String, Vec<Hit>>>,
}

/// A scripted server; see the module docs.
#[derive(Clone)]
pub struct ScriptServer {
    addr: SocketAddr,
    state: Arc<State>,
}

impl ScriptServer {
    /// Binds an ephemeral port on 127.0.0.1 and serves on the current runtime.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());

        let server_state = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = Arc::clone(&server_state);
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(Arc::clone(&state), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        ScriptServer { addr, state }
    }

    /// Sets the script of `path`.
    pub fn script(&self, path: &str, steps: impl IntoIterator<Item = Step>) {
        let steps: VecDeque<Step> = steps.into_iter().collect();
        assert!(!steps.is_empty(), "a script needs at least one step");
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(path.to_owned(), steps);
    }

    /// Returns the requests `path` received, in order.
    pub fn hits(&self, path: &str) -> Vec<Hit> {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let headers = request.headers().clone();
    let collected = request.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    state
        .hits
        .lock()
        .unwrap()
        .entry(path.clone())
        .or_default()
        .push(Hit {
            method,
            headers,
            body,
            trailers,
        });

    let step = {
        let mut scripts = state.scripts.lock().unwrap();
        let script = scripts
            .get_mut(&path)
            .unwrap_or_else(|| panic!("no script for {path}"));
        if script.len() > 1 {
            script.pop_front().unwrap()
        } else {
            script[0].clone()
        }
    };

    match step {
        Step::Reset => Err(std::io::Error::other("scripted reset")),
        Step::Respond {
            status,
            headers,
            delay,
        } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut response = Response::new(Full::new(Bytes::from(format!("status {status}"))));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            for (name, value) in headers {
                response.headers_mut().append(
                    HeaderName::from_static(name),
                    HeaderValue::from_str(&value).unwrap(),
                );
            }
            Ok(response)
        }
    }
}

/// Builds a hyper-util client over plain HTTP/1.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Builds a request with a small body.
pub fn request(method: Method, url: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from_static(b"order=1")))
        .unwrap()
}

/// Infallible, for `service_fn` closures.
pub type Never = Infallible;
