//! A TCP proxy in front of RabbitMQ that reads the AMQP 0-9-1 frames the client
//! sends and records every `basic.ack` and `basic.nack`, so a test can see what
//! reached the wire; and that can cut every connection at once, the way a
//! crashed client's connection ends.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A settlement frame the client sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    Ack {
        tag: u64,
        multiple: bool,
    },
    Nack {
        tag: u64,
        multiple: bool,
        requeue: bool,
    },
}

pub struct FrameProxy {
    pub port: u16,
    frames: Arc<Mutex<Vec<Settle>>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    listener: JoinHandle<()>,
}

impl FrameProxy {
    /// Listen on a free loopback port, forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let upstream = upstream.to_owned();
        let accept = {
            let (frames, tasks) = (frames.clone(), tasks.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let server = TcpStream::connect(&upstream)
                        .await
                        .expect("the proxy reaches RabbitMQ");
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let frames = frames.clone();
                    let up = tokio::spawn(async move {
                        let _ = forward_frames(&mut client_rx, &mut server_tx, &frames).await;
                    });
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                    });
                    tasks.lock().unwrap().extend([up, down]);
                }
            })
        };
        FrameProxy {
            port,
            frames,
            tasks,
            listener: accept,
        }
    }

    /// The settlement frames sent so far, in order.
    pub fn settlements(&self) -> Vec<Settle> {
        self.frames.lock().unwrap().clone()
    }

    /// End every connection and stop accepting: the broker sees the client gone.
    pub fn cut(&self) {
        self.listener.abort();
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for FrameProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Copy client bytes to the server frame by frame, recording settlements.
async fn forward_frames(
    rx: &mut tokio::net::tcp::OwnedReadHalf,
    tx: &mut tokio::net::tcp::OwnedWriteHalf,
    frames: &Mutex<Vec<Settle>>,
) -> std::io::Result<()> {
    // "AMQP" 0 0 9 1
    let mut protocol = [0u8; 8];
    rx.read_exact(&mut protocol).await?;
    tx.write_all(&protocol).await?;
    let mut header = [0u8; 7];
    loop {
        rx.read_exact(&mut header).await?;
        let size = u32::from_be_bytes(header[3..7].try_into().unwrap()) as usize;
        // The payload and the frame-end octet.
        let mut body = vec![0u8; size + 1];
        rx.read_exact(&mut body).await?;
        if header[0] == 1 && size >= 13 {
            let class = u16::from_be_bytes([body[0], body[1]]);
            let method = u16::from_be_bytes([body[2], body[3]]);
            let tag = u64::from_be_bytes(body[4..12].try_into().unwrap());
            let bits = body[12];
            let settle = match (class, method) {
                (60, 80) => Some(Settle::Ack {
                    tag,
                    multiple: bits & 1 != 0,
                }),
                (60, 120) => Some(Settle::Nack {
                    tag,
                    multiple: bits & 1 != 0,
                    requeue: bits & 2 != 0,
                }),
                _ => None,
            };
            if let Some(s) = settle {
                frames.lock().unwrap().push(s);
            }
        }
        tx.write_all(&header).await?;
        tx.write_all(&body).await?;
    }
}
