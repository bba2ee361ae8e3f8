//! A loopback TCP proxy that can be frozen: while frozen it forwards nothing in either
//! direction but keeps every socket open (no FIN, no RST), like a blackholed network or a stuck
//! pooler. New connections are accepted while frozen, and connect upstream only once thawed.
//! It also records what went through each connection (see [`Exchange`]).

use anyhow::Result;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Bytes kept from the start of each direction: enough for an HTTP head.
const HEAD: usize = 4096;

/// One proxied connection: the first bytes each way (the request and response heads, for
/// HTTP) and how many bytes went each way.
#[derive(Debug, Default, Clone)]
pub struct Exchange {
    pub up: Vec<u8>,
    pub down: Vec<u8>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

type Exchanges = Arc<Mutex<Vec<Exchange>>>;

pub struct FreezableProxy {
    port: u16,
    frozen: watch::Sender<bool>,
    exchanges: Exchanges,
    /// Owns the connection tasks: aborting it drops them, closing every socket.
    accept: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    /// Listen on a free loopback port, forwarding each connection to `127.0.0.1:upstream_port`.
    pub async fn start(upstream_port: u16) -> Result<FreezableProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (frozen, _) = watch::channel(false);
        let exchanges = Exchanges::default();
        let accept = tokio::spawn({
            let frozen = frozen.subscribe();
            let exchanges = exchanges.clone();
            async move {
                let mut conns = JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let frozen = frozen.clone();
                    let record = Record::new(&exchanges);
                    conns.spawn(async move {
                        let _ = relay(client, upstream_port, frozen, record).await;
                    });
                    while conns.try_join_next().is_some() {}
                }
            }
        });
        Ok(FreezableProxy {
            port,
            frozen,
            exchanges,
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every connection so far, in the order they were accepted.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().unwrap().clone()
    }

    /// Stop forwarding: bytes (and closes) from either side are held until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn wait_thawed(frozen: &mut watch::Receiver<bool>) {
    // The sender lives as long as the proxy; if it is gone the task is being dropped anyway.
    let _ = frozen.wait_for(|f| !*f).await;
}

/// Where one direction of a connection is recorded: its [`Exchange`] and which way.
#[derive(Clone)]
struct Record {
    exchanges: Exchanges,
    index: usize,
    up: bool,
}

impl Record {
    fn new(exchanges: &Exchanges) -> Record {
        let mut all = exchanges.lock().unwrap();
        all.push(Exchange::default());
        Record {
            exchanges: exchanges.clone(),
            index: all.len() - 1,
            up: true,
        }
    }

    fn add(&self, bytes: &[u8]) {
        let mut all = self.exchanges.lock().unwrap();
        let e = &mut all[self.index];
        let (head, count) = if self.up {
            (&mut e.up, &mut e.bytes_up)
        } else {
            (&mut e.down, &mut e.bytes_down)
        };
        *count += bytes.len() as u64;
        let room = HEAD.saturating_sub(head.len()).min(bytes.len());
        head.extend_from_slice(&bytes[..room]);
    }
}

/// One connection: connect upstream (once thawed), then one pump per direction.
async fn relay(client: TcpStream, upstream_port: u16, mut frozen: watch::Receiver<bool>, record: Record) -> Result<()> {
    wait_thawed(&mut frozen).await;
    let upstream = TcpStream::connect(("127.0.0.1", upstream_port)).await?;
    let (client_r, client_w) = client.into_split();
    let (upstream_r, upstream_w) = upstream.into_split();
    let down_record = Record {
        up: false,
        ..record.clone()
    };
    let up = pump(client_r, upstream_w, frozen.clone(), record);
    let down = pump(upstream_r, client_w, frozen, down_record);
    let _ = tokio::join!(up, down);
    Ok(())
}

/// Copy `from` to `to`; what was read while frozen (data, end of stream or an error) is passed
/// on only after the thaw. Reading stops while a chunk is held, so the sender's kernel buffers
/// fill as they would behind a dead network.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    record: Record,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = from.read(&mut buf).await;
        wait_thawed(&mut frozen).await;
        match read {
            Ok(0) => return to.shutdown().await,
            Ok(n) => {
                record.add(&buf[..n]);
                to.write_all(&buf[..n]).await?
            }
            Err(e) => return Err(e),
        }
    }
}
