//! The stack configuration: TOML in, `Arc<dyn StorageBackend>` out; every mistake is an
//! error naming the key and what is allowed; no password in errors or `Debug`.
//!
//! Built with the default `sqlite` feature: most stacks here are over SQLite.
#![cfg(feature = "sqlite")]

use std::time::Duration;

use aiecs_storage::config::{
    parse_duration, CacheSettings, FailoverSettings, RetrySettings, TimeoutSettings,
};
use aiecs_storage::prelude::*;
use aiecs_storage::{HealthReport, LayerConfig, StorageConfig, StorageError};

const SECRET: &str = "hunter2-s3cret";

/// The reason of an `InvalidInput { field: "config" }`, or a panic naming what came.
fn reason(result: aiecs_storage::Result<StorageConfig>) -> String {
    match result {
        Err(StorageError::InvalidInput { field, reason }) => {
            assert_eq!(field, "config", "{reason}");
            reason
        }
        Err(other) => panic!("expected InvalidInput on config, got {other:?}"),
        Ok(config) => panic!("expected an error, got {config:?}"),
    }
}

fn toml_error(text: &str) -> String {
    reason(StorageConfig::from_toml_str(text))
}

/// Component names from the outermost layer down, following the first component.
fn chain(report: &HealthReport) -> Vec<String> {
    let mut names = vec![report.component.clone()];
    let mut next = report.components.first();
    while let Some(r) = next {
        names.push(r.component.clone());
        next = r.components.first();
    }
    names
}

const FULL: &str = r#"
url = "memory://"

[[layers]]
type = "logging"
slow_threshold = "250ms"
backend_label = "sessions"

[[layers]]
type = "metrics"
backend_label = "sessions"

[[layers]]
type = "retry"
max_attempts = 4
min_delay = "20ms"
max_delay = "1s"
max_elapsed = "5s"
retry_non_idempotent = false

[[layers]]
type = "timeout"
timeout = "2s"

[[layers]]
type = "cache"
max_entries = 1000
time_to_live = "5m"
time_to_idle = "1m30s"
unknown_outcome_window = "10s"

[[layers]]
type = "failover"
fallback = "memory://"
failure_threshold = 3
cooldown = "10s"
max_pending = 100
primary_timeout = "500ms"

[[layers]]
type = "batch"
max_batch = 64
linger = "2ms"
max_queue = 1000
"#;

#[test]
fn a_full_file_parses_into_typed_settings() {
    let config = StorageConfig::from_toml_str(FULL).unwrap();
    assert_eq!(config.url, "memory://");
    let types: Vec<_> = config.layers.iter().map(LayerConfig::type_name).collect();
    assert_eq!(
        types,
        ["logging", "metrics", "retry", "timeout", "cache", "failover", "batch"]
    );
    assert_eq!(
        config.layers[2],
        LayerConfig::Retry(RetrySettings {
            max_attempts: Some(4),
            min_delay: Some(Duration::from_millis(20)),
            max_delay: Some(Duration::from_secs(1)),
            max_elapsed: Some(Duration::from_secs(5)),
            retry_non_idempotent: Some(false),
        })
    );
    assert_eq!(
        config.layers[3],
        LayerConfig::Timeout(TimeoutSettings {
            timeout: Duration::from_secs(2)
        })
    );
    assert_eq!(
        config.layers[4],
        LayerConfig::Cache(CacheSettings {
            max_entries: Some(1000),
            max_bytes: None,
            time_to_live: Some(Duration::from_secs(300)),
            time_to_idle: Some(Duration::from_secs(90)),
            unknown_outcome_window: Some(Duration::from_secs(10)),
            coherent: None,
        })
    );
    let LayerConfig::Failover(failover) = &config.layers[5] else {
        panic!("{:?}", config.layers[5]);
    };
    assert_eq!(failover.fallback, "memory://");
    assert_eq!(failover.failure_threshold, Some(3));
    assert_eq!(failover.cooldown, Some(Duration::from_secs(10)));
    assert_eq!(failover.max_pending, Some(100));
    assert_eq!(failover.primary_timeout, Some(Duration::from_millis(500)));
    config.validate().unwrap();
}

#[tokio::test]
async fn build_stacks_the_layers_outermost_first_and_the_stack_works() {
    let storage = StorageConfig::from_toml_str(FULL).unwrap().build().unwrap();
    storage.initialize().await.unwrap();
    storage
        .create_session("s1", "alice", &Default::default())
        .await
        .unwrap();
    assert_eq!(
        storage.get_session("s1").await.unwrap().unwrap().user_id,
        "alice"
    );
    let report = storage.health_check().await.unwrap();
    assert_eq!(
        chain(&report),
        ["logging", "metrics", "retry", "timeout", "cache", "failover", "batch", "memory"],
        "{report:#?}"
    );
    storage.close().await.unwrap();

    // The order is the file's, whatever it is.
    let reversed = StorageConfig::from_toml_str(
        "url = \"memory://\"\n\
         [[layers]]\ntype = \"timeout\"\ntimeout = \"1s\"\n\
         [[layers]]\ntype = \"retry\"\n",
    )
    .unwrap()
    .build()
    .unwrap();
    let report = reversed.health_check().await.unwrap();
    assert_eq!(chain(&report), ["timeout", "retry", "memory"]);
}

#[tokio::test]
async fn no_layers_is_the_bare_backend() {
    let storage = StorageConfig::from_toml_str("url = \"sqlite::memory:\"")
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(storage.kind(), "sqlite");
    assert_eq!(chain(&storage.health_check().await.unwrap()), ["sqlite"]);
}

#[tokio::test]
async fn the_failover_fallback_is_opened_from_its_url_and_receives_writes() {
    let dir = tempfile::tempdir().unwrap();
    let fallback = dir.path().join("fallback.db");
    let text = format!(
        "url = \"memory://\"\n[[layers]]\ntype = \"failover\"\nfallback = \"sqlite://{}\"\n",
        fallback.display()
    );
    let storage = StorageConfig::from_toml_str(&text)
        .unwrap()
        .build()
        .unwrap();
    storage.initialize().await.unwrap();
    storage
        .create_session("s1", "alice", &Default::default())
        .await
        .unwrap();
    storage.close().await.unwrap();

    let direct = aiecs_storage::open(&format!("sqlite://{}", fallback.display())).unwrap();
    let copy = direct.get_session("s1").await.unwrap();
    assert_eq!(copy.map(|s| s.user_id).as_deref(), Some("alice"));
    direct.close().await.unwrap();
}

#[test]
fn unknown_keys_name_the_key_and_the_allowed_ones() {
    let reason = toml_error("url = \"memory://\"\nlayer = []\n");
    assert_eq!(reason, "unknown key `layer`; allowed keys: url, layers");

    let reason = toml_error(
        "url = \"memory://\"\n[[layers]]\ntype = \"retry\"\n[[layers]]\ntype = \"cache\"\nmax_entriez = 5\n",
    );
    assert_eq!(
        reason,
        "layers[1]: unknown key `max_entriez` for a `cache` layer; allowed keys: type, \
         max_entries, max_bytes, time_to_live, time_to_idle, unknown_outcome_window, coherent"
    );

    let reason = toml_error(
        "url = \"memory://\"\n[[layers]]\ntype = \"failover\"\nfallback = \"memory://\"\nretries = 2\n",
    );
    assert!(reason.starts_with("layers[0]: unknown key `retries` for a `failover` layer; allowed keys: type, fallback, failure_threshold, cooldown, max_pending"), "{reason}");
}

#[test]
fn unknown_or_missing_layer_types_list_the_types() {
    let reason = toml_error("url = \"memory://\"\n[[layers]]\ntype = \"cahce\"\n");
    assert_eq!(
        reason,
        "layers[0].type: unknown layer type `cahce`; allowed types: cache, retry, timeout, \
         batch, failover, metrics, logging"
    );
    let reason = toml_error("url = \"memory://\"\n[[layers]]\nmax_entries = 3\n");
    assert_eq!(
        reason,
        "layers[0].type is missing; allowed types: cache, retry, timeout, batch, failover, \
         metrics, logging"
    );
    let reason = toml_error("url = \"memory://\"\n[[layers]]\ntype = 3\n");
    assert!(
        reason.starts_with("layers[0].type: expected a string"),
        "{reason}"
    );
    let reason = toml_error("url = \"memory://\"\nlayers = [\"cache\"]\n");
    assert!(
        reason.starts_with("layers[0]: expected a table ([[layers]] in TOML) with a `type` key"),
        "{reason}"
    );
    let reason = toml_error("url = \"memory://\"\nlayers = \"cache\"\n");
    assert!(
        reason.starts_with("layers: expected an array of tables"),
        "{reason}"
    );
}

#[test]
fn required_keys_are_named_when_missing() {
    assert_eq!(
        toml_error("url = \"memory://\"\n[[layers]]\ntype = \"timeout\"\n"),
        "layers[0].timeout is missing: a `timeout` layer requires it (a duration such as \
         \"500ms\" or \"2s\")"
    );
    assert!(
        toml_error("url = \"memory://\"\n[[layers]]\ntype = \"failover\"\n")
            .starts_with("layers[0].fallback is missing: a `failover` layer requires it")
    );
    assert!(toml_error("[[layers]]\ntype = \"retry\"\n").starts_with("url is missing"));
    assert!(toml_error("url = 5\n").starts_with("url: expected a string"));
    assert!(toml_error("url = \"\"\n").starts_with("url: expected a backend URL"));
}

#[test]
fn bad_values_name_the_key_path_and_what_is_allowed() {
    let layer = |body: &str| toml_error(&format!("url = \"memory://\"\n[[layers]]\n{body}\n"));
    assert_eq!(
        layer("type = \"cache\"\nmax_entries = \"lots\""),
        "layers[0].max_entries: expected an integer of at least 1, got \"lots\""
    );
    assert_eq!(
        layer("type = \"cache\"\nmax_entries = 0"),
        "layers[0].max_entries: expected an integer of at least 1, got 0"
    );
    assert_eq!(
        layer("type = \"retry\"\nmax_attempts = 1000"),
        "layers[0].max_attempts: expected an integer from 1 to 100, got 1000"
    );
    assert_eq!(
        layer("type = \"batch\"\nmax_batch = -1"),
        "layers[0].max_batch: expected an integer from 1 to 10000, got -1"
    );
    assert_eq!(
        layer("type = \"retry\"\nretry_non_idempotent = \"yes\""),
        "layers[0].retry_non_idempotent: expected true or false, got \"yes\""
    );
    assert_eq!(
        layer("type = \"cache\"\nmax_entries = 10\nmax_bytes = 100"),
        "layers[0]: set `max_entries` or `max_bytes`, not both (a cache has one bound)"
    );
    assert_eq!(
        layer("type = \"retry\"\nmin_delay = \"2s\"\nmax_delay = \"1s\""),
        "layers[0]: min_delay (2s) is longer than max_delay (1s)"
    );
    assert_eq!(
        layer("type = \"metrics\"\nbackend_label = \"\""),
        "layers[0].backend_label: expected a name of 1 to 64 printable characters, got \"\""
    );
}

#[test]
fn durations_need_a_unit() {
    let layer = |body: &str| toml_error(&format!("url = \"memory://\"\n[[layers]]\n{body}\n"));
    assert_eq!(
        layer("type = \"timeout\"\ntimeout = \"5 minutes\""),
        "layers[0].timeout: expected a duration of more than 0, such as \"500ms\", \"2s\", \
         \"5m\" or \"1h\", got \"5 minutes\" (unknown unit `minutes`; units: ms, s, m, h, d)"
    );
    assert_eq!(
        layer("type = \"timeout\"\ntimeout = 500"),
        "layers[0].timeout: expected a duration of more than 0, such as \"500ms\", \"2s\", \
         \"5m\" or \"1h\", got 500 (a bare number is ambiguous: write \"500s\" or \"500ms\")"
    );
    assert!(layer("type = \"timeout\"\ntimeout = \"0s\"")
        .starts_with("layers[0].timeout: expected a duration of more than 0"));
    // Zero is allowed where it means something.
    StorageConfig::from_toml_str(
        "url = \"memory://\"\n[[layers]]\ntype = \"batch\"\nlinger = \"0ms\"\n",
    )
    .unwrap();
    // The other convention, `*_ms` integers, is refused with a pointer to this one.
    assert_eq!(
        layer("type = \"timeout\"\ntimeout_ms = 500"),
        "layers[0]: unknown key `timeout_ms` for a `timeout` layer; allowed keys: type, \
         timeout (durations are strings with a unit: write timeout = \"500ms\")"
    );
}

#[test]
fn parse_duration_forms() {
    let ok = |s: &str| parse_duration(s).unwrap();
    assert_eq!(ok("500ms"), Duration::from_millis(500));
    assert_eq!(ok("2s"), Duration::from_secs(2));
    assert_eq!(ok("5m"), Duration::from_secs(300));
    assert_eq!(ok("1h"), Duration::from_secs(3600));
    assert_eq!(ok("1d"), Duration::from_secs(86_400));
    assert_eq!(ok("1.5s"), Duration::from_millis(1500));
    assert_eq!(ok("0.1s"), Duration::from_millis(100));
    assert_eq!(ok("1m30s"), Duration::from_secs(90));
    assert_eq!(ok(" 1h 30m "), Duration::from_secs(5400));
    assert_eq!(ok("0ms"), Duration::ZERO);
    for bad in [
        "",
        "90",
        "s",
        "1x",
        "1.2.3s",
        "-1s",
        "1e3s",
        "99999999999999999999999d",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn syntax_errors_name_line_and_column_without_the_password() {
    let text = format!("url = \"redis://:{SECRET}@h:6379\"\n[[layers]\ntype = \"retry\"\n");
    let reason = toml_error(&text);
    assert!(
        reason.starts_with("TOML syntax error at line 2, column"),
        "{reason}"
    );
    assert!(!reason.contains(SECRET), "{reason}");

    let text = format!("url = \"redis://:{SECRET}@h:6379\n");
    let reason = toml_error(&text);
    assert!(
        reason.starts_with("TOML syntax error at line 1"),
        "{reason}"
    );
    assert!(!reason.contains(SECRET), "{reason}");
}

#[test]
fn no_password_in_debug_or_errors() {
    let text = format!(
        "url = \"postgres://app:{SECRET}@db:5432/x\"\n\
         [[layers]]\ntype = \"failover\"\nfallback = \"redis://:{SECRET}@cache:6379/0\"\n"
    );
    let config = StorageConfig::from_toml_str(&text).unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("postgres://app:***@db:5432/x"), "{debug}");
    assert!(debug.contains("redis://:***@cache:6379/0"), "{debug}");
    let debug = format!("{config:#?}");
    assert!(!debug.contains(SECRET), "{debug}");

    // A URL-valued key of the wrong shape is not echoed.
    let reason = toml_error(&format!(
        "url = \"memory://\"\n[[layers]]\ntype = \"failover\"\nfallback = [\"redis://:{SECRET}@h\"]\n"
    ));
    assert_eq!(
        reason,
        "layers[0].fallback: expected a string, got an array"
    );

    // A scheme this build cannot open, with a password in it.
    let config = StorageConfig::new(format!("mysql://root:{SECRET}@db/x"));
    let err = config.build().err().unwrap();
    let text = format!("{err} {err:?}");
    assert!(!text.contains(SECRET), "{text}");
    assert!(
        matches!(&err, StorageError::InvalidInput { field: "config", reason } if reason.starts_with("url: ")),
        "{err:?}"
    );

    // The cluster form and query passwords are redacted too.
    let config = StorageConfig::new(format!("redis+cluster://u:{SECRET}@a:1,b:2/0")).with_layer(
        LayerConfig::Failover(FailoverSettings {
            fallback: format!("postgres://app@db/x?password={SECRET}"),
            failure_threshold: None,
            cooldown: None,
            max_pending: None,
            primary_timeout: None,
            journal: None,
        }),
    );
    let debug = format!("{config:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("redis+cluster://u:***@a:1,b:2/0"), "{debug}");
    assert!(debug.contains("password=***"), "{debug}");
}

#[test]
fn overrides_replace_the_url_and_set_layer_keys() {
    let base = StorageConfig::from_toml_str(
        "url = \"memory://\"\n\
         [[layers]]\ntype = \"cache\"\n\
         [[layers]]\ntype = \"timeout\"\ntimeout = \"1s\"\n\
         [[layers]]\ntype = \"failover\"\nfallback = \"memory://\"\n",
    )
    .unwrap();
    let config = base
        .clone()
        .with_overrides([
            ("AIECS_STORAGE_URL", "sqlite::memory:"),
            ("AIECS_STORAGE_CACHE__MAX_ENTRIES", "5000"),
            ("aiecs_storage_cache__time_to_live", "10m"),
            ("AIECS_STORAGE_TIMEOUT__TIMEOUT", "250ms"),
            ("AIECS_STORAGE_FAILOVER__FALLBACK", "sqlite::memory:"),
            ("AIECS_STORAGE_CONFIG", "/etc/ignored.toml"),
            ("PATH", "/usr/bin"),
        ])
        .unwrap();
    assert_eq!(config.url, "sqlite::memory:");
    assert_eq!(
        config.layers[0],
        LayerConfig::Cache(CacheSettings {
            max_entries: Some(5000),
            time_to_live: Some(Duration::from_secs(600)),
            ..Default::default()
        })
    );
    assert_eq!(
        config.layers[1],
        LayerConfig::Timeout(TimeoutSettings {
            timeout: Duration::from_millis(250)
        })
    );
    let LayerConfig::Failover(f) = &config.layers[2] else {
        panic!()
    };
    assert_eq!(f.fallback, "sqlite::memory:");
    // No overrides: unchanged.
    let none: [(&str, &str); 0] = [];
    assert_eq!(base.clone().with_overrides(none).unwrap(), base);
}

#[test]
fn bad_overrides_name_the_variable_and_the_key() {
    let base = StorageConfig::from_toml_str(
        "url = \"memory://\"\n[[layers]]\ntype = \"cache\"\n[[layers]]\ntype = \"retry\"\n[[layers]]\ntype = \"retry\"\n",
    )
    .unwrap();
    let err = |name: &str, value: &str| reason(base.clone().with_overrides([(name, value)]));
    assert_eq!(
        err("AIECS_STORAGE_CACHE__MAX_ENTRIES", "lots"),
        "AIECS_STORAGE_CACHE__MAX_ENTRIES: layers[0].max_entries: expected an integer of at \
         least 1, got \"lots\""
    );
    // Rules across keys are checked after an override too.
    let bounded = reason(base.clone().with_overrides([
        ("AIECS_STORAGE_CACHE__MAX_ENTRIES", "10"),
        ("AIECS_STORAGE_CACHE__MAX_BYTES", "100"),
    ]));
    assert_eq!(
        bounded,
        "AIECS_STORAGE_CACHE__MAX_ENTRIES: layers[0]: set `max_entries` or `max_bytes`, not \
         both (a cache has one bound)"
    );
    assert_eq!(
        err("AIECS_STORAGE_CACHE__MAX_ENTRIEZ", "5"),
        "AIECS_STORAGE_CACHE__MAX_ENTRIEZ: layers[0]: unknown key `max_entriez` for a \
         `cache` layer; allowed keys: type, max_entries, max_bytes, time_to_live, time_to_idle, unknown_outcome_window, coherent"
    );
    assert_eq!(
        err("AIECS_STORAGE_CAHCE__MAX_ENTRIES", "5"),
        "AIECS_STORAGE_CAHCE__MAX_ENTRIES: unknown layer type `cahce`; allowed types: cache, \
         retry, timeout, batch, failover, metrics, logging"
    );
    assert!(err("AIECS_STORAGE_TIMEOUT__TIMEOUT", "1s")
        .starts_with("AIECS_STORAGE_TIMEOUT__TIMEOUT: the configuration has no `timeout` layer"));
    assert!(err("AIECS_STORAGE_RETRY__MAX_ATTEMPTS", "2")
        .starts_with("AIECS_STORAGE_RETRY__MAX_ATTEMPTS: the configuration has 2 `retry` layers"));
    assert!(err("AIECS_STORAGE_URL", " ").starts_with("AIECS_STORAGE_URL is empty"));
    // A URL override's value is never echoed.
    let with_failover =
        StorageConfig::new("memory://").with_layer(LayerConfig::Failover(FailoverSettings {
            fallback: "memory://".into(),
            failure_threshold: None,
            cooldown: None,
            max_pending: None,
            primary_timeout: None,
            journal: None,
        }));
    let reason = reason(
        with_failover.with_overrides([("AIECS_STORAGE_FAILOVER__FALLBACK", SECRET.to_owned())]),
    );
    assert!(!reason.contains(SECRET), "{reason}");
    assert!(reason.contains("layers[0].fallback"), "{reason}");
}

#[test]
fn the_process_environment_is_read() {
    // The only test of this binary that touches the environment.
    std::env::set_var("AIECS_STORAGE_URL", "sqlite::memory:");
    std::env::set_var("AIECS_STORAGE_RETRY__MAX_ATTEMPTS", "7");
    let config =
        StorageConfig::from_toml_str("url = \"memory://\"\n[[layers]]\ntype = \"retry\"\n")
            .unwrap()
            .with_env_overrides();
    std::env::remove_var("AIECS_STORAGE_URL");
    std::env::remove_var("AIECS_STORAGE_RETRY__MAX_ATTEMPTS");
    let config = config.unwrap();
    assert_eq!(config.url, "sqlite::memory:");
    assert_eq!(
        config.layers[0],
        LayerConfig::Retry(RetrySettings {
            max_attempts: Some(7),
            ..Default::default()
        })
    );
}

#[test]
fn files_are_read_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storage.toml");
    std::fs::write(&path, FULL).unwrap();
    let config = StorageConfig::from_file(&path).unwrap();
    assert_eq!(config.layers.len(), 7);

    std::fs::write(&path, "url = \"memory://\"\nextra = 1\n").unwrap();
    let why = reason(StorageConfig::from_file(&path));
    assert_eq!(
        why,
        format!(
            "{}: unknown key `extra`; allowed keys: url, layers",
            path.display()
        )
    );

    let missing = dir.path().join("missing.toml");
    let why_missing = reason(StorageConfig::from_file(&missing));
    assert!(
        why_missing.starts_with(&format!(
            "cannot read the config file {}",
            missing.display()
        )),
        "{why_missing}"
    );
}

#[test]
fn any_serde_format_works() {
    let config: StorageConfig = serde_json::from_value(serde_json::json!({
        "url": "memory://",
        "layers": [{"type": "timeout", "timeout": "3s"}],
    }))
    .unwrap();
    assert_eq!(
        config.layers,
        [LayerConfig::Timeout(TimeoutSettings {
            timeout: Duration::from_secs(3)
        })]
    );
    let err = serde_json::from_value::<StorageConfig>(serde_json::json!({
        "url": "memory://",
        "layers": [{"type": "timeout", "timeout": "3s", "colour": "blue"}],
    }))
    .unwrap_err();
    assert!(err
        .to_string()
        .starts_with("layers[0]: unknown key `colour` for a `timeout` layer"));
}

#[test]
fn configurations_built_in_code_are_validated_too() {
    let config =
        StorageConfig::new("memory://").with_layer(LayerConfig::Timeout(TimeoutSettings {
            timeout: Duration::ZERO,
        }));
    let err = config.build().err().unwrap();
    assert!(
        matches!(&err, StorageError::InvalidInput { field: "config", reason } if reason.starts_with("layers[0].timeout: must be more than 0")),
        "{err:?}"
    );
    let config =
        StorageConfig::new("memory://").with_layer(LayerConfig::Failover(FailoverSettings {
            fallback: "nosuch://x".into(),
            failure_threshold: None,
            cooldown: None,
            max_pending: None,
            primary_timeout: None,
            journal: None,
        }));
    let err = config.build().err().unwrap();
    assert!(
        matches!(&err, StorageError::InvalidInput { field: "config", reason } if reason.starts_with("layers[0].fallback: ")),
        "{err:?}"
    );
}

#[test]
fn open_still_takes_every_local_form() {
    assert_eq!(aiecs_storage::open("memory://").unwrap().kind(), "memory");
    assert_eq!(
        aiecs_storage::open("sqlite::memory:").unwrap().kind(),
        "sqlite"
    );
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    assert_eq!(aiecs_storage::open(&url).unwrap().kind(), "sqlite");
}

/// Every form of every key, valid or not, in a file and in an environment variable,
/// with what the parser answered when the settings moved to their layers: a change in
/// any answer is a change of behaviour, not a refactoring. `BLESS=1` rewrites the file.
#[test]
fn every_form_of_every_key_answers_as_pinned() {
    const DURATIONS: &[&str] = &[
        "\"250ms\"",
        "\"1.5s\"",
        "\"0s\"",
        "\"0ms\"",
        "\"1m30s\"",
        "\" 1h 30m \"",
        "\"1d\"",
        "\"0.1s\"",
        "\".5s\"",
        "\"5.s\"",
        "\"2 s\"",
        "\"1h1h\"",
        "500",
        "1.5",
        "2.0",
        "-1",
        "true",
        "\"\"",
        "\"5 minutes\"",
        "\"1e3s\"",
        "\"-1s\"",
        "\"1.2.3s\"",
        "[\"1s\"]",
        "{ s = 1 }",
        "\"99999999999999999999999d\"",
        "\"1.0000000001s\"",
        "\"1S\"",
    ];
    const INTEGERS: &[&str] = &[
        "0",
        "1",
        "100",
        "101",
        "1000",
        "-1",
        "1.5",
        "\"5\"",
        "\"lots\"",
        "true",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "16777216",
        "16777217",
        "10000",
        "10001",
    ];
    const BOOLEANS: &[&str] = &["true", "false", "\"true\"", "\"yes\"", "1"];
    const STRINGS: &[&str] = &[
        "\"sessions\"",
        "\"\"",
        "\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"",
        "\"a\\tb\"",
        "5",
        "\"ünïcødé\"",
        "\"memory://\"",
        "\"nocolon\"",
        "[\"x\"]",
        "\"sqlite::memory:\"",
    ];
    const ENV: &[&str] = &[
        "5000",
        " 5 ",
        "0",
        "-1",
        "lots",
        "TRUE",
        "false",
        "yes",
        "250ms",
        "1.5s",
        "0s",
        "500",
        "",
        "sqlite::memory:",
        "nocolon",
        "sessions",
    ];
    let keys: &[(&str, &str, &[&str])] = &[
        ("cache", "max_entries", INTEGERS),
        ("cache", "max_bytes", INTEGERS),
        ("cache", "time_to_live", DURATIONS),
        ("cache", "time_to_idle", DURATIONS),
        ("cache", "unknown_outcome_window", DURATIONS),
        ("cache", "coherent", BOOLEANS),
        ("retry", "max_attempts", INTEGERS),
        ("retry", "min_delay", DURATIONS),
        ("retry", "max_delay", DURATIONS),
        ("retry", "max_elapsed", DURATIONS),
        ("retry", "retry_non_idempotent", BOOLEANS),
        ("timeout", "timeout", DURATIONS),
        ("batch", "max_batch", INTEGERS),
        ("batch", "linger", DURATIONS),
        ("batch", "max_queue", INTEGERS),
        ("failover", "fallback", STRINGS),
        ("failover", "failure_threshold", INTEGERS),
        ("failover", "cooldown", DURATIONS),
        ("failover", "max_pending", INTEGERS),
        ("failover", "primary_timeout", DURATIONS),
        ("failover", "journal", STRINGS),
        ("metrics", "backend_label", STRINGS),
        ("logging", "backend_label", STRINGS),
        ("logging", "slow_threshold", DURATIONS),
        ("cache", "max_entriez", INTEGERS),
        ("timeout", "timeout_ms", INTEGERS),
        ("retry", "type", STRINGS),
    ];
    let required = |kind: &str| match kind {
        "timeout" => "timeout = \"1s\"\n",
        "failover" => "fallback = \"memory://\"\n",
        _ => "",
    };
    let answer = |result: aiecs_storage::Result<StorageConfig>| match result {
        Ok(config) => match config.validate() {
            Ok(()) => format!("ok {:?}", config.layers),
            Err(e) => format!("ok, invalid: {e}"),
        },
        Err(e) => format!("error: {e}"),
    };
    let mut out = String::new();
    for (kind, key, values) in keys {
        for value in *values {
            let mut body = required(kind).to_owned();
            if body.starts_with(&format!("{key} ")) {
                body.clear();
            }
            let text = format!(
                "url = \"memory://\"\n[[layers]]\ntype = \"{kind}\"\n{body}{key} = {value}\n"
            );
            out.push_str(&format!(
                "file {kind}.{key} = {value}\n  {}\n",
                answer(StorageConfig::from_toml_str(&text))
            ));
        }
        let base = StorageConfig::from_toml_str(&format!(
            "url = \"memory://\"\n[[layers]]\ntype = \"{kind}\"\n{}",
            required(kind)
        ))
        .unwrap();
        for value in ENV {
            let name = format!(
                "AIECS_STORAGE_{}__{}",
                kind.to_uppercase(),
                key.to_uppercase()
            );
            out.push_str(&format!(
                "env {name}={value:?}\n  {}\n",
                answer(base.clone().with_overrides([(name.as_str(), *value)]))
            ));
        }
    }
    let documents = [
        "",
        "url = \"memory://\"\nlayers = []\n",
        "url = \"memory://\"\nurl2 = 1\n",
        "url = 5\n",
        "url = \"\"\n",
        "url = \"nocolon\"\n",
        "url = \" \"\n",
        "url = \"memory://\"\nlayers = 5\n",
        "url = \"memory://\"\nlayers = [5]\n",
        "url = \"memory://\"\nlayers = [{}]\n",
        "url = \"memory://\"\nlayers = [{ type = \"\" }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"Cache\" }]\n",
        "url = \"memory://\"\nlayers = [{ type = [\"cache\"] }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"cache\", max_entries = 0, max_bytes = 0 }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"cache\", max_entries = 5, max_bytes = 6 }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"cache\", zzz = 1, max_entries = \"x\" }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"cache\", aaa = 1, max_entries = \"x\" }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"retry\", min_delay = \"1s\", max_delay = \"1s\" }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"retry\", min_delay = \"1.5s\", max_delay = \"1s\" }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"timeout\", timeout_ms = 5 }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"failover\", fallback = \"\" , cooldown = 5 }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"failover\", zzz = 1 }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"failover\", cooldown = \"1s\" }]\n",
        "url = \"memory://\"\nlayers = [{ type = \"cache\" }, { type = \"cache\" }, { type = \"nope\" }]\n",
        "url = \"memory://\"\n[[layers]]\ntype = \"logging\"\n[[layers]]\ntype = \"metrics\"\n",
    ];
    for text in documents {
        out.push_str(&format!(
            "document {text:?}\n  {}\n",
            answer(StorageConfig::from_toml_str(text))
        ));
    }
    // JSON, through `Deserialize`: null, and keys TOML cannot spell.
    let json = [
        serde_json::json!({"url": "memory://", "layers": [{"type": "cache", "max_entries": null}]}),
        serde_json::json!({"url": "memory://", "layers": [{"type": "retry", "retry_non_idempotent": null}]}),
        serde_json::json!({"url": "memory://", "layers": [{"type": "metrics", "backend_label": null}]}),
        serde_json::json!({"url": "memory://", "layers": [{"type": "failover", "fallback": null}]}),
        serde_json::json!({"url": "memory://", "layers": [{"type": "failover", "fallback": 5}]}),
        serde_json::json!({"url": "memory://", "layers": [{"type": "timeout", "timeout": 1e20}]}),
        serde_json::json!({"url": "memory://", "layers": [{"type": "cache", "max_entries": 18446744073709551615u64}]}),
        serde_json::json!({"url": "memory://", "layers": [{"type": "batch", "max_queue": 18446744073709551615u64}]}),
        serde_json::json!({"url": "memory://", "layers": [{"type": "cache", "": 1}]}),
        serde_json::json!({"url": null}),
        serde_json::json!([1]),
    ];
    for value in json {
        let answer = match serde_json::from_value::<StorageConfig>(value.clone()) {
            Ok(config) => format!("ok {:?}", config.layers),
            Err(e) => format!("error: {e}"),
        };
        out.push_str(&format!("json {value}\n  {answer}\n"));
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/config_forms.txt");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(path, &out).unwrap();
    }
    let pinned = std::fs::read_to_string(path).unwrap();
    for (i, (now, then)) in out.lines().zip(pinned.lines()).enumerate() {
        assert_eq!(now, then, "line {}", i + 1);
    }
    assert_eq!(out.lines().count(), pinned.lines().count());
}

#[test]
fn allowed_keys_are_the_fields_of_each_settings_type() {
    let config = StorageConfig::from_toml_str(FULL).unwrap();
    let keys: Vec<String> = config
        .layers
        .iter()
        .map(|l| format!("{}: {}", l.type_name(), l.allowed_keys().join(", ")))
        .collect();
    assert_eq!(
        keys,
        [
            "logging: backend_label, slow_threshold",
            "metrics: backend_label",
            "retry: max_attempts, min_delay, max_delay, max_elapsed, retry_non_idempotent",
            "timeout: timeout",
            "cache: max_entries, max_bytes, time_to_live, time_to_idle, unknown_outcome_window, coherent",
            "failover: fallback, failure_threshold, cooldown, max_pending, primary_timeout, journal",
            "batch: max_batch, linger, max_queue",
        ]
    );
}

#[test]
fn an_override_keeps_every_other_key_to_the_nanosecond() {
    let retry = RetrySettings {
        max_attempts: Some(100),
        min_delay: Some(Duration::new(0, 1)),
        max_delay: Some(Duration::new(90, 123_456_789)),
        max_elapsed: Some(Duration::MAX),
        retry_non_idempotent: None,
    };
    let config = StorageConfig::new("memory://")
        .with_layer(LayerConfig::Retry(retry.clone()))
        .with_overrides([("AIECS_STORAGE_RETRY__RETRY_NON_IDEMPOTENT", "true")])
        .unwrap();
    assert_eq!(
        config.layers,
        [LayerConfig::Retry(RetrySettings {
            retry_non_idempotent: Some(true),
            ..retry
        })]
    );
}

#[tokio::test]
async fn a_failover_journal_comes_from_the_stack_file() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("failover.journal");
    let text = format!(
        "url = \"memory://\"\n[[layers]]\ntype = \"failover\"\nfallback = \"memory://\"\njournal = {:?}\n",
        journal.display().to_string()
    );
    let storage = StorageConfig::from_toml_str(&text)
        .unwrap()
        .build()
        .unwrap();
    storage
        .create_session("s", "u", &aiecs_storage::Metadata::new())
        .await
        .unwrap();
    let report = storage.health_check().await.unwrap();
    assert_eq!(
        report.details["journal_depth"],
        serde_json::json!(0),
        "{report:?}"
    );
    assert!(
        journal.exists(),
        "the journal file is made when the stack is built"
    );
}
