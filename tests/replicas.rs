//! `IdempotencyLayer` across server replicas that are separate processes sharing one
//! store, some of them killed with SIGKILL, over `RedisStore` and over `PostgresStore`.
//!
//! The test binary runs itself again as each replica: `replica_process` serves when
//! `TSR_REPLICA_CONFIG` contains a replica configuration and returns at once otherwise. The
//! handler of a replica writes to a ledger in the same backend (a Redis list or a
//! PostgreSQL table) that outlives the replica, so a test counts effects after a kill.
//!
//! The tests need the `redis` and `postgres` features and connect to `REDIS_URL` and
//! `DATABASE_URL`. Without them they print why they are skipped and pass, unless
//! `REQUIRE_BACKENDS=1` is set:
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 \
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test REQUIRE_BACKENDS=1 \
//!     cargo test --features redis,postgres --test replicas
//! ```

#[cfg(not(all(feature = "redis", feature = "postgres")))]
#[test]
fn replica_features_off() {
    use std::io::Write as _;

    // Written to stderr directly, because the test harness captures `eprintln!`.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: the redis and postgres features are not both on, so the replica tests \
         did not run; run cargo test --features redis,postgres --test replicas"
    );
}

/// Serves as one replica when `TSR_REPLICA_CONFIG` is set, until the parent test kills
/// it or closes its stdin. Returns at once otherwise.
#[cfg(all(feature = "redis", feature = "postgres"))]
#[test]
fn replica_process() {
    harness::serve_from_env();
}

#[cfg(all(feature = "redis", feature = "postgres"))]
mod harness {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::SocketAddr;
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::Duration;

    use axum::Router;
    use axum::body::Body;
    use axum::extract::State;
    use axum::routing::post;
    use bytes::Bytes;
    use http::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION};
    use http::{HeaderMap, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use serde::{Deserialize, Serialize};
    use tokio::net::TcpListener;
    use tokio_postgres::NoTls;
    use tower_safe_retry::idempotency::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
    use tower_safe_retry::{IdempotencyLayer, IdempotencyStore, PostgresStore, RedisStore};

    /// The environment variable that makes `replica_process` serve, with a JSON
    /// [`ReplicaConfig`] as its value.
    const CONFIG_VAR: &str = "TSR_REPLICA_CONFIG";

    /// The text before the address in the stdout line on which a replica reports it.
    const LISTENING: &str = "replica listening on ";

    /// How long a replica may take from spawn to reporting its address. Generous, because
    /// several replicas start at once on a loaded machine.
    const START_TIMEOUT: Duration = Duration::from_secs(60);

    /// The replay TTL of the replicas and the TTL of the Redis ledger lists, so that data
    /// a failed test leaves in Redis expires.
    const LEFTOVER_TTL: Duration = Duration::from_secs(120);

    /// The `Authorization` header of every test request, so the default scope is a keyed
    /// digest that depends on the scope secret, not the fixed `anonymous` scope.
    pub const CALLER: &str = "Bearer replica-test-caller";

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum Backend {
        Redis,
        Postgres,
    }

    impl Backend {
        /// Returns the backend's URL, or `None` after printing why the test is skipped.
        ///
        /// # Panics
        ///
        /// When the URL variable is unset and `REQUIRE_BACKENDS=1`.
        pub fn url(self) -> Option<String> {
            let (variable, example) = match self {
                Backend::Redis => ("REDIS_URL", "redis://127.0.0.1:6379"),
                Backend::Postgres => ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
            };
            match std::env::var(variable) {
                Ok(url) if !url.is_empty() => Some(url),
                _ if std::env::var_os("REQUIRE_BACKENDS").is_some_and(|value| value == "1") => {
                    panic!(
                        "{variable} is not set, but REQUIRE_BACKENDS=1 requires the replica \
                         tests to run; set it, for example to {example}"
                    )
                }
                _ => {
                    // Written to stderr directly, because the test harness captures
                    // `eprintln!`.
                    let _ = writeln!(
                        std::io::stderr(),
                        "skipped: {variable} is not set, so the {self:?} replica tests did \
                         not run"
                    );
                    None
                }
            }
        }
    }

    /// The configuration of one replica process.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct ReplicaConfig {
        /// The replica's name, which its handler writes to the ledger and the body.
        pub name: String,
        pub backend: Backend,
        pub url: String,
        /// The Redis key prefix or the PostgreSQL table of the idempotency records. The
        /// ledger is named after it.
        pub namespace: String,
        pub lock_ttl_ms: u64,
        /// How long the handler waits between its `started` and `effect` ledger entries.
        pub hold_ms: u64,
        /// The layer's scope secret, or `None` for `DEFAULT_SCOPE_SECRET`.
        pub scope_secret: Option<[u8; 32]>,
    }

    impl ReplicaConfig {
        pub fn new(name: &str, namespace: &Namespace) -> Self {
            ReplicaConfig {
                name: name.to_owned(),
                backend: namespace.backend,
                url: namespace.url.clone(),
                namespace: namespace.name.clone(),
                lock_ttl_ms: 10_000,
                hold_ms: 0,
                scope_secret: None,
            }
        }

        pub fn lock_ttl(mut self, ttl: Duration) -> Self {
            self.lock_ttl_ms = u64::try_from(ttl.as_millis()).unwrap();
            self
        }

        pub fn hold(mut self, hold: Duration) -> Self {
            self.hold_ms = u64::try_from(hold.as_millis()).unwrap();
            self
        }

        pub fn scope_secret(mut self, secret: [u8; 32]) -> Self {
            self.scope_secret = Some(secret);
            self
        }
    }

    /// A replica process, killed when dropped.
    pub struct Replica {
        pub name: String,
        pub address: SocketAddr,
        child: Child,
    }

    impl Replica {
        /// Starts one process per configuration at once and waits until each reports its
        /// address.
        ///
        /// # Panics
        ///
        /// When a replica exits or stays silent for 60 s. The unwinding then kills every
        /// replica this call started.
        pub fn start_all(configs: &[ReplicaConfig]) -> Vec<Replica> {
            let mut pending = Vec::new();
            for config in configs {
                pending.push(spawn(config));
            }
            let mut replicas = Vec::new();
            for (mut replica, addresses) in pending {
                match addresses.recv_timeout(START_TIMEOUT) {
                    Ok(address) => replica.address = address,
                    Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                        "replica {} did not report its address within {START_TIMEOUT:?}",
                        replica.name
                    ),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let status = replica.child.wait();
                        panic!(
                            "replica {} exited before it reported its address, with \
                             {status:?}. Its stderr is above",
                            replica.name
                        )
                    }
                }
                replicas.push(replica);
            }
            replicas
        }

        /// Kills the process with SIGKILL and waits for it to exit.
        pub fn kill(&mut self) {
            self.child.kill().expect("failed to kill the replica");
            self.child.wait().expect("failed to wait for the replica");
        }
    }

    impl Drop for Replica {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Spawns the test binary as a replica whose address is not known yet, and a thread
    /// that sends the address the replica reports and then drains its stdout.
    fn spawn(config: &ReplicaConfig) -> (Replica, mpsc::Receiver<SocketAddr>) {
        let executable = std::env::current_exe().expect("failed to find the test binary");
        let mut child = Command::new(executable)
            .args([
                "--exact",
                "replica_process",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CONFIG_VAR, serde_json::to_string(config).unwrap())
            // The replica exits when this pipe closes, so it dies with the test process
            // even when the test process is killed and never runs `Drop`.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("failed to start the test binary as a replica");
        let stdout = child.stdout.take().unwrap();
        let replica = Replica {
            name: config.name.clone(),
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            child,
        };
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else {
                    break;
                };
                // The line may start with the harness's `test replica_process ... `.
                if let Some((_, address)) = line.split_once(LISTENING) {
                    let _ = sender.send(address.parse().expect("an address"));
                }
            }
        });
        (replica, receiver)
    }

    /// Serves as the replica that `TSR_REPLICA_CONFIG` describes, or returns at once when
    /// it is unset.
    pub fn serve_from_env() {
        let Some(config) = std::env::var_os(CONFIG_VAR) else {
            return;
        };
        let config = config.into_string().expect("TSR_REPLICA_CONFIG is UTF-8");
        let config: ReplicaConfig =
            serde_json::from_str(&config).expect("TSR_REPLICA_CONFIG is a replica config");

        std::thread::spawn(|| {
            let mut ignored = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut ignored);
            std::process::exit(0);
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(serve(config));
    }

    async fn serve(config: ReplicaConfig) {
        let ledger = Ledger::connect(config.backend, &config.url, &config.namespace).await;
        let charges = Arc::new(Charges {
            replica: config.name.clone(),
            hold: Duration::from_millis(config.hold_ms),
            ledger,
        });
        let routes = Router::new()
            .route("/charges", post(charge))
            .with_state(charges);
        let app = match config.backend {
            Backend::Redis => {
                let store = RedisStore::connect(&config.url)
                    .await
                    .expect("failed to connect the replica to Redis")
                    .prefix(config.namespace.clone());
                routes.layer(layer(store, &config))
            }
            Backend::Postgres => {
                let store = PostgresStore::connect(&config.url)
                    .await
                    .expect("failed to connect the replica to PostgreSQL")
                    .table(&config.namespace);
                routes.layer(layer(store, &config))
            }
        };

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // With `--nocapture` the harness passes `println!` output straight to stdout.
        println!("{LISTENING}{address}");
        axum::serve(listener, app).await.unwrap();
    }

    fn layer<St: IdempotencyStore>(store: St, config: &ReplicaConfig) -> IdempotencyLayer<St> {
        let layer = IdempotencyLayer::new(store)
            .lock_ttl(Duration::from_millis(config.lock_ttl_ms))
            .replay_ttl(LEFTOVER_TTL);
        match config.scope_secret {
            Some(secret) => layer.scope_secret(secret),
            None => layer,
        }
    }

    /// The state of the charge handler.
    struct Charges {
        replica: String,
        hold: Duration,
        ledger: Ledger,
    }

    /// Writes `started`, waits, then writes the effect, as a transaction would commit at
    /// the end, and returns `201` with a body that names the replica and a new charge id.
    /// The effect entry is the body itself.
    async fn charge(State(charges): State<Arc<Charges>>) -> Response<Body> {
        let charge = uuid::Uuid::new_v4().simple().to_string();
        if let Err(error) = charges
            .ledger
            .append(Event::Started, &charges.replica)
            .await
        {
            return ledger_failed(&error);
        }
        tokio::time::sleep(charges.hold).await;
        let body = format!(r#"{{"charge":"{charge}","replica":"{}"}}"#, charges.replica);
        if let Err(error) = charges.ledger.append(Event::Effect, &body).await {
            return ledger_failed(&error);
        }
        Response::builder()
            .status(StatusCode::CREATED)
            .header(CONTENT_TYPE, "application/json")
            .header(LOCATION, format!("/charges/{charge}"))
            .body(Body::from(body))
            .unwrap()
    }

    /// Returns `500`, which releases the key, so the failure reaches the test as a status.
    fn ledger_failed(error: &str) -> Response<Body> {
        let _ = writeln!(std::io::stderr(), "replica: ledger write failed: {error}");
        Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from(format!("ledger write failed: {error}")))
            .unwrap()
    }

    #[derive(Clone, Copy, Debug)]
    pub enum Event {
        /// The handler started. Its value is the replica name.
        Started,
        /// The handler's effect, written when it ends. Its value is the response body.
        Effect,
    }

    impl Event {
        fn as_str(self) -> &'static str {
            match self {
                Event::Started => "started",
                Event::Effect => "effect",
            }
        }
    }

    /// Handler events in the backend under test, shared by every replica of a test and
    /// kept when a replica dies.
    #[derive(Clone)]
    pub enum Ledger {
        /// One list per event, `{namespace}:ledger:{event}`.
        Redis {
            connection: redis::aio::MultiplexedConnection,
            namespace: String,
        },
        /// The table `{namespace}_ledger`.
        Postgres {
            client: Arc<tokio_postgres::Client>,
            table: String,
        },
    }

    impl Ledger {
        pub async fn connect(backend: Backend, url: &str, namespace: &str) -> Ledger {
            match backend {
                Backend::Redis => {
                    let client = redis::Client::open(url).expect("REDIS_URL is a valid URL");
                    let connection = client
                        .get_multiplexed_async_connection()
                        .await
                        .unwrap_or_else(|error| {
                            panic!("failed to connect to Redis at {url}: {error}")
                        });
                    Ledger::Redis {
                        connection,
                        namespace: namespace.to_owned(),
                    }
                }
                Backend::Postgres => Ledger::Postgres {
                    client: Arc::new(connect_postgres(url).await),
                    table: format!("{namespace}_ledger"),
                },
            }
        }

        /// Appends `value` to the entries of `event`.
        pub async fn append(&self, event: Event, value: &str) -> Result<(), String> {
            match self {
                Ledger::Redis {
                    connection,
                    namespace,
                } => {
                    let list = format!("{namespace}:ledger:{}", event.as_str());
                    let ttl = i64::try_from(LEFTOVER_TTL.as_millis()).unwrap();
                    redis::pipe()
                        .atomic()
                        .rpush(&list, value)
                        .ignore()
                        .pexpire(&list, ttl)
                        .ignore()
                        .query_async::<()>(&mut connection.clone())
                        .await
                        .map_err(|error| error.to_string())
                }
                Ledger::Postgres { client, table } => {
                    let sql = format!("INSERT INTO {table} (event, value) VALUES ($1, $2)");
                    client
                        .execute(&sql, &[&event.as_str(), &value])
                        .await
                        .map(drop)
                        .map_err(|error| error.to_string())
                }
            }
        }

        /// Returns the entries of `event`, oldest first.
        pub async fn entries(&self, event: Event) -> Vec<String> {
            match self {
                Ledger::Redis {
                    connection,
                    namespace,
                } => {
                    let list = format!("{namespace}:ledger:{}", event.as_str());
                    redis::cmd("LRANGE")
                        .arg(&list)
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut connection.clone())
                        .await
                        .unwrap_or_else(|error| panic!("LRANGE {list} failed: {error}"))
                }
                Ledger::Postgres { client, table } => {
                    let sql = format!("SELECT value FROM {table} WHERE event = $1 ORDER BY id");
                    let rows = client
                        .query(&sql, &[&event.as_str()])
                        .await
                        .unwrap_or_else(|error| panic!("{sql:?} failed: {error}"));
                    rows.iter().map(|row| row.get(0)).collect()
                }
            }
        }
    }

    async fn connect_postgres(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .unwrap_or_else(|error| panic!("failed to connect to PostgreSQL: {error}"));
        tokio::spawn(connection);
        client
    }

    /// A name unique to one test run for the records and the ledger, whose data is
    /// deleted when this value is dropped.
    pub struct Namespace {
        pub backend: Backend,
        pub url: String,
        pub name: String,
    }

    impl Namespace {
        /// Picks a new name and, on PostgreSQL, creates the record and ledger tables.
        pub async fn create(backend: Backend, url: &str, label: &str) -> Namespace {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let namespace = Namespace {
                backend,
                url: url.to_owned(),
                name: format!("replicas_{label}_{}", &id[..12]),
            };
            if backend == Backend::Postgres {
                let store = PostgresStore::connect(url)
                    .await
                    .unwrap_or_else(|error| panic!("failed to connect to PostgreSQL: {error}"))
                    .table(&namespace.name);
                store
                    .migrate()
                    .await
                    .expect("failed to create the records table");
                let client = connect_postgres(url).await;
                let sql = format!(
                    "CREATE TABLE {}_ledger (id bigserial PRIMARY KEY, event text NOT NULL, \
                     value text NOT NULL)",
                    namespace.name
                );
                client
                    .batch_execute(&sql)
                    .await
                    .expect("failed to create the ledger table");
            }
            namespace
        }

        async fn delete(backend: Backend, url: &str, name: &str) -> Result<(), String> {
            match backend {
                Backend::Redis => {
                    let client = redis::Client::open(url).map_err(|error| error.to_string())?;
                    let mut connection = client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(|error| error.to_string())?;
                    let pattern = format!("{name}:*");
                    let mut cursor: u64 = 0;
                    loop {
                        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut connection)
                            .await
                            .map_err(|error| error.to_string())?;
                        if !keys.is_empty() {
                            redis::cmd("DEL")
                                .arg(&keys)
                                .query_async::<()>(&mut connection)
                                .await
                                .map_err(|error| error.to_string())?;
                        }
                        if next == 0 {
                            return Ok(());
                        }
                        cursor = next;
                    }
                }
                Backend::Postgres => {
                    let client = connect_postgres(url).await;
                    let sql = format!("DROP TABLE IF EXISTS {name}, {name}_ledger");
                    client
                        .batch_execute(&sql)
                        .await
                        .map_err(|error| error.to_string())
                }
            }
        }
    }

    impl Drop for Namespace {
        fn drop(&mut self) {
            let backend = self.backend;
            let url = self.url.clone();
            let name = self.name.clone();
            // Drop runs inside the test's runtime, which cannot block on a future, so
            // the cleanup gets a thread and a runtime of its own.
            let cleanup = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                if let Err(error) = runtime.block_on(Namespace::delete(backend, &url, &name)) {
                    eprintln!("failed to delete the test data of {name}: {error}");
                }
            });
            let _ = cleanup.join();
        }
    }

    pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

    pub fn client() -> HttpClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    /// One response as the client received it.
    pub struct Received {
        pub status: StatusCode,
        pub headers: HeaderMap,
        pub body: Bytes,
    }

    impl Received {
        /// Returns whether the response carries `Idempotent-Replayed: true`.
        pub fn replayed(&self) -> bool {
            self.headers
                .get(IDEMPOTENT_REPLAYED)
                .is_some_and(|value| value == "true")
        }
    }

    /// Builds the charge request that every test sends: one caller, one body.
    pub fn charge_request(address: SocketAddr, key: &str) -> Request<Full<Bytes>> {
        Request::post(format!("http://{address}/charges"))
            .header(IDEMPOTENCY_KEY, key)
            .header(AUTHORIZATION, CALLER)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(b"{\"amount\":100}")))
            .unwrap()
    }

    /// Sends the charge request and reads the whole response.
    ///
    /// # Panics
    ///
    /// When the request fails or takes over 30 s.
    pub async fn post_charge(client: &HttpClient, address: SocketAddr, key: &str) -> Received {
        let exchange = async {
            let response = client
                .request(charge_request(address, key))
                .await
                .unwrap_or_else(|error| panic!("POST to {address} failed: {error}"));
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .unwrap_or_else(|error| panic!("reading the body from {address} failed: {error}"));
            Received {
                status: parts.status,
                headers: parts.headers,
                body: body.to_bytes(),
            }
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .unwrap_or_else(|_| panic!("POST to {address} timed out after 30 s"))
    }

    /// Returns a new `Idempotency-Key` that starts with `label`.
    pub fn new_key(label: &str) -> String {
        format!("{label}-{}", uuid::Uuid::new_v4().simple())
    }
}

/// The scenarios, each run once per backend by the `redis` and `postgres` modules.
#[cfg(all(feature = "redis", feature = "postgres"))]
mod scenarios {
    use std::io::Write as _;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use http::StatusCode;
    use http::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER};
    use http_body_util::BodyExt;
    use tower_safe_retry::idempotency::IDEMPOTENT_REPLAYED;

    use crate::harness::{
        Backend, Event, Ledger, Namespace, Received, Replica, ReplicaConfig, charge_request,
        client, new_key, post_charge,
    };

    /// Asserts that `received` is a `201` replay of `first`: the same status, stored
    /// headers and body bytes, marked `Idempotent-Replayed: true`.
    fn assert_replay_of(received: &Received, first: &Received, context: &str) {
        assert_eq!(received.status, StatusCode::CREATED, "{context}");
        assert!(
            received.replayed(),
            "{context}: a 201 without Idempotent-Replayed: true"
        );
        assert_eq!(received.body, first.body, "{context}: body");
        assert_eq!(
            received.headers.get(CONTENT_TYPE),
            first.headers.get(CONTENT_TYPE),
            "{context}: Content-Type"
        );
        assert_eq!(
            received.headers.get(LOCATION),
            first.headers.get(LOCATION),
            "{context}: Location"
        );
    }

    fn report(line: &str) {
        // Written to stderr directly, because the test harness captures `eprintln!`.
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    /// Three replicas share the store and receive 500 concurrent duplicates round-robin,
    /// while the handler holds for 300 ms. A fourth replica with another scope secret
    /// then receives the same request.
    pub async fn duplicates_run_once(backend: Backend) {
        const REQUESTS: usize = 500;
        let Some(url) = backend.url() else {
            return;
        };
        let namespace = Namespace::create(backend, &url, "dup").await;
        let hold = Duration::from_millis(300);
        let configs = [
            ReplicaConfig::new("a", &namespace).hold(hold),
            ReplicaConfig::new("b", &namespace).hold(hold),
            ReplicaConfig::new("c", &namespace).hold(hold),
            ReplicaConfig::new("other-secret", &namespace)
                .hold(hold)
                .scope_secret([7; 32]),
        ];
        let replicas = tokio::task::block_in_place(|| Replica::start_all(&configs));
        let (sharing, other_secret) = replicas.split_at(3);
        let other_secret = &other_secret[0];
        let ledger = Ledger::connect(backend, &url, &namespace.name).await;
        let client = client();
        let key = new_key("dup");

        let barrier = Arc::new(tokio::sync::Barrier::new(REQUESTS));
        let mut tasks = Vec::new();
        for request in 0..REQUESTS {
            let address = sharing[request % sharing.len()].address;
            let client = client.clone();
            let key = key.clone();
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                post_charge(&client, address, &key).await
            }));
        }
        let started = Instant::now();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        let elapsed = started.elapsed();

        let effects = ledger.entries(Event::Effect).await;
        assert_eq!(effects.len(), 1, "effects in the ledger: {effects:?}");
        let starts = ledger.entries(Event::Started).await;
        assert_eq!(starts.len(), 1, "handler starts in the ledger: {starts:?}");
        let firsts: Vec<&Received> = results
            .iter()
            .filter(|received| received.status == StatusCode::CREATED && !received.replayed())
            .collect();
        assert_eq!(firsts.len(), 1, "201 responses without Idempotent-Replayed");
        let first = firsts[0];
        assert_eq!(
            first.body,
            effects[0].as_bytes(),
            "body of the first execution"
        );

        let mut conflicts = 0;
        let mut replays = 0;
        for (request, received) in results.iter().enumerate() {
            let context = format!("request {request}");
            match received.status {
                StatusCode::CONFLICT => {
                    conflicts += 1;
                    assert!(
                        received.headers.contains_key(RETRY_AFTER),
                        "{context}: 409 without Retry-After"
                    );
                }
                StatusCode::CREATED if std::ptr::eq(received, first) => {}
                StatusCode::CREATED => {
                    replays += 1;
                    assert_replay_of(received, first, &context);
                }
                status => panic!(
                    "{context}: expected 201 or 409, got {status}: {:?}",
                    received.body
                ),
            }
        }
        assert_eq!(1 + replays + conflicts, REQUESTS);

        // Once every request has its response, each sharing replica replays.
        for replica in sharing {
            let received = post_charge(&client, replica.address, &key).await;
            assert_replay_of(
                &received,
                first,
                &format!("retry to replica {}", replica.name),
            );
        }

        // The default scope is a BLAKE3 digest of `Authorization` keyed by the scope
        // secret. A replica with another secret computes another scope for the same
        // caller, so it finds no record and runs the request again. Replicas that share
        // a store must therefore share the secret, or a retry that reaches a replica
        // with another secret repeats the effect.
        let other = post_charge(&client, other_secret.address, &key).await;
        assert_eq!(other.status, StatusCode::CREATED, "other secret: status");
        assert!(
            !other.replayed(),
            "other secret: replayed the shared record"
        );
        assert_ne!(other.body, first.body, "other secret: body");
        let effects = ledger.entries(Event::Effect).await;
        assert_eq!(
            effects.len(),
            2,
            "effects after the other secret: {effects:?}"
        );
        assert_eq!(
            effects[1].as_bytes(),
            other.body,
            "effect of the other secret"
        );
        let again = post_charge(&client, other_secret.address, &key).await;
        assert_replay_of(&again, &other, "retry to the other secret");
        let shared = post_charge(&client, sharing[0].address, &key).await;
        assert_replay_of(&shared, first, "retry to replica a after the other secret");

        report(&format!(
            "{backend:?}: {REQUESTS} duplicates over 3 replicas in {elapsed:?}: 1 first \
             execution, {replays} replays, {conflicts} 409s"
        ));
    }

    /// Replica A dies by SIGKILL while its handler runs under the claim. Replica B takes
    /// the key over once the lease expires and runs the handler.
    pub async fn crash_during_handler(backend: Backend) {
        let Some(url) = backend.url() else {
            return;
        };
        let lock_ttl = Duration::from_secs(1);
        let namespace = Namespace::create(backend, &url, "midway").await;
        let configs = [
            ReplicaConfig::new("a", &namespace)
                .lock_ttl(lock_ttl)
                .hold(Duration::from_secs(5)),
            ReplicaConfig::new("b", &namespace).lock_ttl(lock_ttl),
        ];
        let mut replicas = tokio::task::block_in_place(|| Replica::start_all(&configs));
        let ledger = Ledger::connect(backend, &url, &namespace.name).await;
        let client = client();
        let key = new_key("midway");

        let sent = Instant::now();
        let first_attempt = tokio::spawn({
            let client = client.clone();
            let request = charge_request(replicas[0].address, &key);
            async move { client.request(request).await }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while ledger.entries(Event::Started).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the handler on replica a did not start within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        replicas[0].kill();
        let killed = Instant::now();
        let outcome = first_attempt.await.unwrap();
        assert!(
            outcome.is_err(),
            "the request to the killed replica got a response"
        );

        let replica_b = replicas[1].address;
        let mut conflicts = 0;
        let (success, succeeded) = loop {
            let received = post_charge(&client, replica_b, &key).await;
            let received_at = Instant::now();
            match received.status {
                StatusCode::CREATED => break (received, received_at),
                StatusCode::CONFLICT => {
                    conflicts += 1;
                    assert!(
                        received.headers.contains_key(RETRY_AFTER),
                        "409 without Retry-After"
                    );
                }
                status => panic!("expected 201 or 409, got {status}: {:?}", received.body),
            }
            assert!(
                killed.elapsed() < lock_ttl + Duration::from_secs(10),
                "replica b did not take the key over within the lock TTL and 10 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };

        assert!(conflicts >= 1, "no 409 while the dead replica held the key");
        assert!(!success.replayed(), "the takeover was a replay");
        // The claim was made after `sent`, and each renewal only moves the lease's end
        // later, so the lease cannot expire before `sent + lock_ttl`. That is the lock
        // TTL after the kill, minus the time from sending to the kill.
        assert!(
            succeeded >= sent + lock_ttl,
            "replica b ran the request {:?} after it was sent, within the {lock_ttl:?} lock TTL",
            succeeded - sent
        );
        assert!(
            succeeded - killed < lock_ttl + Duration::from_secs(5),
            "replica b ran the request {:?} after the kill",
            succeeded - killed
        );

        let starts = ledger.entries(Event::Started).await;
        assert_eq!(starts, ["a", "b"], "handler starts in the ledger");
        let effects = ledger.entries(Event::Effect).await;
        assert_eq!(effects.len(), 1, "effects in the ledger: {effects:?}");
        assert_eq!(effects[0].as_bytes(), success.body, "effect of replica b");
        for retry in 0..2 {
            let received = post_charge(&client, replica_b, &key).await;
            assert_replay_of(
                &received,
                &success,
                &format!("retry {retry} after the takeover"),
            );
        }

        report(&format!(
            "{backend:?}: killed replica a {:?} after sending, replica b ran the request \
             {:?} after the kill, after {conflicts} 409s",
            killed - sent,
            succeeded - killed
        ));
    }

    /// Replica A runs a handler for three lock TTLs while replica B polls with the same
    /// key. A's lease renewals keep the key claimed across processes, so B gets `409`
    /// past the lock TTL and then the replay, and never runs the handler.
    pub async fn slow_handler_keeps_key(backend: Backend) {
        let Some(url) = backend.url() else {
            return;
        };
        let lock_ttl = Duration::from_secs(1);
        let namespace = Namespace::create(backend, &url, "slow").await;
        let configs = [
            ReplicaConfig::new("a", &namespace)
                .lock_ttl(lock_ttl)
                .hold(3 * lock_ttl),
            ReplicaConfig::new("b", &namespace).lock_ttl(lock_ttl),
        ];
        let replicas = tokio::task::block_in_place(|| Replica::start_all(&configs));
        let ledger = Ledger::connect(backend, &url, &namespace.name).await;
        let client = client();
        let key = new_key("slow");

        let sent = Instant::now();
        let first_attempt = tokio::spawn({
            let client = client.clone();
            let address = replicas[0].address;
            let key = key.clone();
            async move { post_charge(&client, address, &key).await }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while ledger.entries(Event::Started).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the handler on replica a did not start within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let mut conflicts = 0;
        let mut last_conflict = sent;
        let replay = loop {
            let received = post_charge(&client, replicas[1].address, &key).await;
            match received.status {
                StatusCode::CREATED => break received,
                StatusCode::CONFLICT => {
                    conflicts += 1;
                    last_conflict = Instant::now();
                    assert!(
                        received.headers.contains_key(RETRY_AFTER),
                        "409 without Retry-After"
                    );
                }
                status => panic!("expected 201 or 409, got {status}: {:?}", received.body),
            }
            assert!(
                sent.elapsed() < Duration::from_secs(30),
                "replica b got no 201 within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let first = first_attempt.await.unwrap();

        assert_eq!(first.status, StatusCode::CREATED, "status from replica a");
        assert!(
            !first.replayed(),
            "the response from replica a was a replay"
        );
        assert_replay_of(&replay, &first, "first 201 from replica b");
        // Without renewal the claim would expire one lock TTL after the claim, and B
        // would take the key over and run the handler.
        assert!(
            last_conflict - sent >= 2 * lock_ttl,
            "the last 409 came {:?} after sending, not past two lock TTLs",
            last_conflict - sent
        );
        let starts = ledger.entries(Event::Started).await;
        assert_eq!(starts, ["a"], "handler starts in the ledger");
        let effects = ledger.entries(Event::Effect).await;
        assert_eq!(effects.len(), 1, "effects in the ledger: {effects:?}");
        assert_eq!(effects[0].as_bytes(), first.body, "effect of replica a");

        report(&format!(
            "{backend:?}: replica b got {conflicts} 409s, the last {:?} after sending, then \
             the replay",
            last_conflict - sent
        ));
    }

    /// Replica A stores its response and dies by SIGKILL as soon as the response head
    /// arrives. Replica B then replays the stored response.
    pub async fn crash_after_response(backend: Backend) {
        let Some(url) = backend.url() else {
            return;
        };
        let lock_ttl = Duration::from_secs(1);
        let namespace = Namespace::create(backend, &url, "after").await;
        let configs = [
            ReplicaConfig::new("a", &namespace).lock_ttl(lock_ttl),
            ReplicaConfig::new("b", &namespace).lock_ttl(lock_ttl),
        ];
        let mut replicas = tokio::task::block_in_place(|| Replica::start_all(&configs));
        let ledger = Ledger::connect(backend, &url, &namespace.name).await;
        let client = client();
        let key = new_key("after");

        let response = client
            .request(charge_request(replicas[0].address, &key))
            .await
            .expect("POST to replica a failed");
        replicas[0].kill();
        let (parts, body) = response.into_parts();
        // The body may or may not have reached the client before the kill.
        let body = body.collect().await.ok().map(|body| body.to_bytes());
        assert_eq!(parts.status, StatusCode::CREATED, "status from replica a");
        assert!(
            !parts.headers.contains_key(IDEMPOTENT_REPLAYED),
            "the first response was a replay"
        );

        let effects = ledger.entries(Event::Effect).await;
        assert_eq!(effects.len(), 1, "effects in the ledger: {effects:?}");
        let first = Received {
            status: parts.status,
            headers: parts.headers,
            body: bytes::Bytes::from(effects[0].clone()),
        };
        if let Some(body) = &body {
            assert_eq!(*body, first.body, "body from replica a");
        }

        let replay = post_charge(&client, replicas[1].address, &key).await;
        assert_replay_of(&replay, &first, "retry to replica b");

        // A completed record lasts for the replay TTL, not the lock TTL.
        tokio::time::sleep(lock_ttl + Duration::from_millis(200)).await;
        let late = post_charge(&client, replicas[1].address, &key).await;
        assert_replay_of(&late, &first, "retry to replica b after the lock TTL");

        let starts = ledger.entries(Event::Started).await;
        assert_eq!(starts, ["a"], "handler starts in the ledger");
        let effects = ledger.entries(Event::Effect).await;
        assert_eq!(effects.len(), 1, "effects after the retries: {effects:?}");
        report(&format!(
            "{backend:?}: replica a killed after its response head, body {} before the kill",
            if body.is_some() { "read" } else { "lost" }
        ));
    }
}

#[cfg(all(feature = "redis", feature = "postgres"))]
mod redis {
    use crate::harness::Backend;
    use crate::scenarios;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicates_run_once() {
        scenarios::duplicates_run_once(Backend::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_during_handler() {
        scenarios::crash_during_handler(Backend::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_after_response() {
        scenarios::crash_after_response(Backend::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_handler_keeps_key() {
        scenarios::slow_handler_keeps_key(Backend::Redis).await;
    }
}

#[cfg(all(feature = "redis", feature = "postgres"))]
mod postgres {
    use crate::harness::Backend;
    use crate::scenarios;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicates_run_once() {
        scenarios::duplicates_run_once(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_during_handler() {
        scenarios::crash_during_handler(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_after_response() {
        scenarios::crash_after_response(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_handler_keeps_key() {
        scenarios::slow_handler_keeps_key(Backend::Postgres).await;
    }
}
