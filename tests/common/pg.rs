//! Plain PostgreSQL connections for inspecting the test server, outside the backend
//! under test.

/// A connection to `url` with no TLS, its driver task spawned.
pub async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("raw connection to the test server");
    tokio::spawn(connection);
    client
}

/// Drops `schema` and everything in it.
pub async fn drop_schema(url: &str, schema: &str) {
    raw(url)
        .await
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

/// [`drop_schema`], then waits until the connection is closed, for a test that counts
/// the server's connections afterwards.
pub async fn drop_schema_and_disconnect(url: &str, schema: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("raw connection to the test server");
    let task = tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
}
