//! A TCP proxy a test can cut: a gateway reaches NATS through it, and `cut` drops every
//! connection and refuses new ones (the gateway's sockets to clients stay open) until `restore`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The proxy's open connections.
#[derive(Default)]
struct Connections(Mutex<Vec<AbortHandle>>);

impl Connections {
    fn add(&self, handle: AbortHandle) {
        let mut handles = self.0.lock().expect("connections lock");
        handles.retain(|handle| !handle.is_finished());
        handles.push(handle);
    }

    fn abort_all(&self) {
        for handle in self.0.lock().expect("connections lock").drain(..) {
            handle.abort();
        }
    }
}

/// See the module documentation.
pub(crate) struct TcpProxy {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    connections: Arc<Connections>,
    accept: AbortHandle,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to `upstream`.
    pub(crate) async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let down = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Connections::default());
        let accept = tokio::spawn({
            let down = down.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    connections.add(task.abort_handle());
                }
            }
        })
        .abort_handle();
        TcpProxy {
            addr,
            down,
            connections,
            accept,
        }
    }

    /// `nats://` URL of the proxy.
    pub(crate) fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Drops every open connection and refuses new ones.
    pub(crate) fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.connections.abort_all();
    }

    /// Accepts connections again.
    pub(crate) fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.connections.abort_all();
    }
}
