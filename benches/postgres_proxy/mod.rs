//! A TCP proxy on 127.0.0.1 in front of PostgreSQL that counts the messages clients send.
//!
//! The counts cover only the connections through the proxy, unlike `pg_stat_database`,
//! which counts every session of the database and is updated with a delay. The proxy
//! parses the frontend messages of protocol 3.0: an untyped startup message (after an
//! optional `SSLRequest` or `GSSENCRequest`), then messages of one type byte and a
//! big-endian `i32` length that includes itself. Responses are copied unparsed.

use std::io;
use std::ops::Sub;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::config::Host;

/// The request codes of the untyped messages that come before the startup message.
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;

/// Frontend messages counted since the proxy started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageCounts {
    /// `Execute`: one per statement run with the extended query protocol.
    pub executes: u64,
    /// `Sync`: one per round trip of the extended query protocol.
    pub syncs: u64,
    /// `Parse`: one per statement prepared.
    pub parses: u64,
    /// `Query`: one per simple-protocol query string.
    pub simple_queries: u64,
}

impl Sub for MessageCounts {
    type Output = MessageCounts;

    fn sub(self, earlier: MessageCounts) -> MessageCounts {
        MessageCounts {
            executes: self.executes - earlier.executes,
            syncs: self.syncs - earlier.syncs,
            parses: self.parses - earlier.parses,
            simple_queries: self.simple_queries - earlier.simple_queries,
        }
    }
}

#[derive(Default)]
struct Counters {
    executes: AtomicU64,
    syncs: AtomicU64,
    parses: AtomicU64,
    simple_queries: AtomicU64,
}

impl Counters {
    fn record(&self, message_type: u8) {
        let counter = match message_type {
            b'E' => &self.executes,
            b'S' => &self.syncs,
            b'P' => &self.parses,
            b'Q' => &self.simple_queries,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running proxy. Its tasks run on the runtime that called [`PostgresProxy::start`]
/// until that runtime shuts down.
pub struct PostgresProxy {
    port: u16,
    counters: Arc<Counters>,
}

impl PostgresProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards each connection to the
    /// first TCP host and port of `config` (port 5432 when it has none).
    pub async fn start(config: tokio_postgres::Config) -> io::Result<Self> {
        let host = config
            .get_hosts()
            .iter()
            .find_map(|host| match host {
                Host::Tcp(name) => Some(name.clone()),
                _ => None,
            })
            .ok_or_else(|| io::Error::other("DATABASE_URL names no TCP host"))?;
        let port = config.get_ports().first().copied().unwrap_or(5432);

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy_port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let accepted = Arc::clone(&counters);
        tokio::spawn(async move {
            loop {
                let (client, _) = match listener.accept().await {
                    Ok(connection) => connection,
                    Err(error) => {
                        eprintln!("postgres proxy: accept failed: {error}");
                        continue;
                    }
                };
                let server = match TcpStream::connect((host.as_str(), port)).await {
                    Ok(server) => server,
                    Err(error) => {
                        eprintln!("postgres proxy: failed to connect to {host}:{port}: {error}");
                        continue;
                    }
                };
                tokio::spawn(forward(client, server, Arc::clone(&accepted)));
            }
        });
        Ok(PostgresProxy {
            port: proxy_port,
            counters,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn counts(&self) -> MessageCounts {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MessageCounts {
            executes: load(&self.counters.executes),
            syncs: load(&self.counters.syncs),
            parses: load(&self.counters.parses),
            simple_queries: load(&self.counters.simple_queries),
        }
    }
}

async fn forward(client: TcpStream, server: TcpStream, counters: Arc<Counters>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, mut client_write) = client.into_split();
    let (mut server_read, server_write) = server.into_split();
    let requests = copy_counted(client_read, server_write, &counters);
    let responses = tokio::io::copy(&mut server_read, &mut client_write);
    // Either direction ends when its peer closes, and the other then ends too.
    let (requests, responses) = tokio::join!(requests, responses);
    if let Err(error) = requests.and(responses.map(drop)) {
        eprintln!("postgres proxy: connection failed: {error}");
    }
}

/// Copies the client's messages to the server one at a time and counts them by type.
async fn copy_counted(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    counters: &Counters,
) -> io::Result<()> {
    let mut message = Vec::new();
    loop {
        let Some(length) = read_length(&mut from).await? else {
            return to.shutdown().await;
        };
        read_body(&mut from, length, &mut message).await?;
        to.write_all(&message).await?;
        if message.len() < 8 {
            let detail = format!(
                "startup message of {} bytes, expected at least 8",
                message.len()
            );
            return Err(io::Error::new(io::ErrorKind::InvalidData, detail));
        }
        let code = i32::from_be_bytes(message[4..8].try_into().expect("four bytes"));
        if code != SSL_REQUEST && code != GSSENC_REQUEST {
            break;
        }
    }
    loop {
        let message_type = match from.read_u8().await {
            Ok(message_type) => message_type,
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                return to.shutdown().await;
            }
            Err(error) => return Err(error),
        };
        let length = read_length(&mut from)
            .await?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        read_body(&mut from, length, &mut message).await?;
        counters.record(message_type);
        message.insert(0, message_type);
        to.write_all(&message).await?;
    }
}

/// Reads a message length, or `None` at the end of the stream.
async fn read_length(from: &mut OwnedReadHalf) -> io::Result<Option<usize>> {
    match from.read_i32().await {
        Ok(length) if length >= 4 => Ok(Some(length as usize)),
        Ok(length) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("invalid message length {length}"),
        )),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(error) => Err(error),
    }
}

/// Reads the rest of a message of `length` bytes into `message`, with the length first.
async fn read_body(
    from: &mut OwnedReadHalf,
    length: usize,
    message: &mut Vec<u8>,
) -> io::Result<()> {
    message.clear();
    message.extend_from_slice(&(length as i32).to_be_bytes());
    message.resize(length, 0);
    from.read_exact(&mut message[4..]).await?;
    Ok(())
}
