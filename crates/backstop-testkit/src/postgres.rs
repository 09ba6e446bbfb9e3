//! Databases of their own on the PostgreSQL server the tests share, which
//! `scripts/test` starts on loopback and names in `BACKSTOP_TEST_POSTGRES`.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The variable naming the test server, as a URL of one of its databases.
pub const URL_VAR: &str = "BACKSTOP_TEST_POSTGRES";

/// The URL of a new, empty database on the test server.
pub async fn database() -> io::Result<String> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let url = std::env::var(URL_VAR).map_err(|_| {
        io::Error::other(format!(
            "{URL_VAR} is not set: run scripts/test, which starts PostgreSQL, or set it to \
             postgres://user@host:port/db"
        ))
    })?;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(connection);
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = format!(
        "backstop_test_{}_{since}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(io::Error::other)?;
    let (server, _) = url
        .rsplit_once('/')
        .ok_or_else(|| io::Error::other(format!("{URL_VAR} names no database: {url}")))?;
    Ok(format!("{server}/{name}"))
}

/// A TCP relay to a PostgreSQL server that a test can cut: while it is cut,
/// its connections are dropped and new ones refused, as a restarting or
/// partitioned database looks to its clients.
pub struct Relay {
    /// The server's URL, through the relay.
    pub url: String,
    up: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    /// A relay to the server of `url`.
    pub async fn to(url: &str) -> io::Result<Self> {
        let config: tokio_postgres::Config = url.parse().map_err(io::Error::other)?;
        let server = match (config.get_hosts().first(), config.get_ports().first()) {
            (Some(tokio_postgres::config::Host::Tcp(host)), Some(port)) => format!("{host}:{port}"),
            _ => return Err(io::Error::other(format!("not a TCP server: {url}"))),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let relay = listener.local_addr()?.to_string();
        let (up, _) = tokio::sync::watch::channel(true);
        let state = up.clone();
        let target = server.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut up = state.subscribe();
                if !*up.borrow_and_update() {
                    continue; // refused: dropped at once
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut out) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                        _ = up.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(Relay {
            url: url.replacen(&server, &relay, 1),
            up,
        })
    }

    /// Drops every connection, and refuses new ones until [`Relay::restore`].
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}
