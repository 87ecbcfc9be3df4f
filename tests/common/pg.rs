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
    drop_schema_on(&raw(url).await, schema).await;
}

/// [`drop_schema`], then waits until the connection is closed, for a test that counts
/// the server's connections afterwards.
pub async fn drop_schema_and_disconnect(url: &str, schema: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("raw connection to the test server");
    let task = tokio::spawn(connection);
    drop_schema_on(&client, schema).await;
    drop(client);
    let _ = task.await;
}

/// Drops `schema` over `client`, again if PostgreSQL broke a deadlock by failing the
/// drop: a backend that used the schema may still be pruning its change log on a task
/// of its own, locking the log's tables in another order than `DROP SCHEMA` does.
async fn drop_schema_on(client: &tokio_postgres::Client, schema: &str) {
    let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    let mut attempts = 0;
    loop {
        match client.batch_execute(&sql).await {
            Ok(()) => return,
            Err(e)
                if attempts < 5
                    && e.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) =>
            {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("drop the test schema {schema}: {e}"),
        }
    }
}
