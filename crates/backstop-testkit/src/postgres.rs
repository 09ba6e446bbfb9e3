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
