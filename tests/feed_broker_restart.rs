//! Exactly-once across a broker restart, on a broker of this test's own.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use common::kafka::{Broker, BrokerGuard};
use common::*;
use sandbox_bridge::clock::ManualClock;
use sandbox_bridge::sim::vt::{BatchSettings, FeedSimSettings, FeedSimulator};

/// A port whose neighbour (the controller's) is free too.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 65000 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_feed_loses_and_duplicates_nothing() {
    let broker = Broker::start(&unique("restart"), free_port_pair());
    let _guard = BrokerGuard(broker.clone());
    let batches = BatchSettings::exact(31, 40);
    let now = test_now();
    let clock = ManualClock::new(now);
    let settings = FeedSimSettings {
        api_key: API_KEY.to_string(),
        batches: batches.clone(),
        ..FeedSimSettings::default()
    };
    let any = "127.0.0.1:0".parse().unwrap();
    let sim = FeedSimulator::start(settings, Arc::new(clock.clone()), any, any)
        .await
        .unwrap();
    let names = Names::new("restart");
    let newest = newest_at(now);
    let start = newest.plus(-29);
    let text = config_text(&broker.bootstrap, &sim.base_url(), &names, start, "")
        .replace("[kafka]", "[kafka]\noperation_timeout = \"10s\"");
    let w = spawn_worker(parse_config(&text), Arc::new(clock.clone()));

    w.wait_committed_through(start.plus(3)).await;
    // The broker goes away while new minutes keep arriving, then comes back.
    broker.stop();
    clock.advance(Duration::from_secs(10 * 60));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let broker = Broker::start(&broker.name, broker.port);
    let newest = newest_at(now + Duration::from_secs(10 * 60));
    w.wait_committed_through(newest).await;
    // librdkafka may ride out the outage inside the open transaction, or the
    // pipeline restarts from the saved position: either way the result is exact.
    w.stop().await.unwrap();

    let want = expected(&batches, minutes(start, newest));
    let got = read_all(&broker.bootstrap, &names.topic);
    assert_eq!(
        got.len(),
        want.records.len(),
        "duplicates or losses across the restart"
    );
    assert_eq!(actual_records(&got), want.records);
}
