//! `/readyz` follows the Kafka broker: on a broker of this test's own,
//! `sandbox-bridge run` (feed worker and rescan consumer) and
//! `sandbox-bridge feed` alone (idle between batches, so only a probe of the
//! cluster notices the loss) are each ready while the broker runs, unready — saying why — once the broker is gone, and ready
//! again after the broker is back. `/healthz` (liveness) stays 200
//! throughout: a broker outage is no reason to restart the process.

mod common;

use std::time::{Duration, Instant};

use common::kafka::{Broker, BrokerGuard};
use common::process::Proc;
use common::prom::{self, get, http_client};
use common::rescan::{Req, RescanNames, publish, rescan_config_text, valid, wait_results};
use common::{Names, config_text, unique};
use sandbox_bridge::clock::{Clock, SystemClock};
use sandbox_bridge::feed::state_store::load_state;
use sandbox_bridge::minute::{FeedWindow, Minute};
use sandbox_bridge::sim::vt::MinuteSet;

/// Polls `/readyz` until `want(status)` holds; returns the status and body.
/// Panics (with the service's log) when the process exits or after `limit`.
async fn wait_readyz(
    p: &mut Proc,
    addr: &str,
    limit: Duration,
    what: &str,
    want: impl Fn(u16) -> bool,
) -> (u16, String) {
    let client = http_client();
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        if let Some((status, body)) = get(&client, addr, "/readyz").await {
            if want(status) {
                return (status, body);
            }
            last = Some((status, body));
        }
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!(
                "the service exited with {status}; log:\n{}",
                prom::tail(&p.log_text(), 60)
            );
        }
        assert!(
            Instant::now() < deadline,
            "/readyz not {what} within {limit:?}; last answer {last:?}; log:\n{}",
            prom::tail(&p.log_text(), 60)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the feed's saved position is past `last`. Reads that fail
/// (a broker just started: no leader yet) count as "not yet".
async fn wait_saved_past(bootstrap: &str, names: &Names, last: Minute, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", bootstrap);
        if let Ok(Some(s)) = load_state(c, &names.state, &names.txid, Duration::from_secs(10))
            && s.next > last
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the feed did not commit past {last} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Which pipelines the service runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pipelines {
    /// `sandbox-bridge run` with `[feed]` and `[rescan]`.
    Both,
    /// `sandbox-bridge feed`.
    FeedOnly,
}

async fn readyz_follows_the_broker(pipelines: Pipelines) {
    let broker = Broker::start(&unique("readyz"), prom::free_port_pair());
    let _guard = BrokerGuard(broker.clone());

    let (vt, ktip) = prom::start_simulators(51, MinuteSet::default()).await;
    let names = Names::new("readyz");
    let rescan = RescanNames::new("readyz");
    let start = FeedWindow::at(SystemClock.now(), 0).newest.plus(-5);
    let feed_text = config_text(&broker.bootstrap, &vt.base_url(), &names, start, "");
    let (subcommand, text) = match pipelines {
        Pipelines::Both => (
            "run",
            prom::run_config(
                &feed_text,
                &rescan_config_text(&broker.bootstrap, &ktip, &rescan, "a", "", ""),
            ),
        ),
        Pipelines::FeedOnly => (
            "feed",
            feed_text.replace("listen = \"off\"", "listen = \"127.0.0.1:0\""),
        ),
    };
    let text = text.replace("[kafka]", "[kafka]\noperation_timeout = \"10s\"");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("service.toml");
    std::fs::write(&config, text).unwrap();
    let mut p = Proc::spawn(subcommand, &config, &dir.path().join("service.log"), &[]);
    let addr = prom::wait_served_address(&mut p, Duration::from_secs(60)).await;
    let client = http_client();

    // Ready while the broker runs, and the pipelines work on it.
    wait_readyz(&mut p, &addr, Duration::from_secs(120), "200", |s| s == 200).await;
    let newest = FeedWindow::at(SystemClock.now(), 0).newest;
    wait_saved_past(&broker.bootstrap, &names, newest, Duration::from_secs(120)).await;
    if pipelines == Pipelines::Both {
        publish(
            &broker.bootstrap,
            &rescan.requests,
            &[Req::json("k", valid("readyz-1"))],
        )
        .await;
        wait_results(
            &broker.bootstrap,
            &rescan.results,
            1,
            Duration::from_secs(120),
        )
        .await;
    }

    // The broker goes away: /readyz says so, /healthz does not.
    broker.stop();
    let stopped = Instant::now();
    let (status, body) = wait_readyz(&mut p, &addr, Duration::from_secs(240), "unready", |s| {
        s != 200
    })
    .await;
    eprintln!(
        "{pipelines:?}: unready {:?} after the broker stopped: {body:?}",
        stopped.elapsed()
    );
    assert_eq!(status, 503, "{body}");
    // "not ready", then one `<component>: <reason>` line per problem.
    let reasons: Vec<&str> = body
        .lines()
        .skip(1)
        .filter(|l| l.split_once(": ").is_some_and(|(_, why)| !why.is_empty()))
        .collect();
    assert!(
        body.starts_with("not ready\n") && !reasons.is_empty(),
        "the body names what is wrong: {body:?}"
    );
    assert!(
        reasons.iter().any(|r| {
            let r = r.to_ascii_lowercase();
            r.contains("kafka") || r.contains("broker")
        }),
        "the reason names Kafka: {body:?}"
    );
    let (live, _) = get(&client, &addr, "/healthz")
        .await
        .expect("/healthz answers");
    assert_eq!(live, 200, "/healthz while the broker is down");

    // The broker comes back: ready again.
    let broker = Broker::start(&broker.name, broker.port);
    let restarted = Instant::now();
    wait_readyz(&mut p, &addr, Duration::from_secs(240), "200 again", |s| {
        s == 200
    })
    .await;
    eprintln!(
        "{pipelines:?}: ready {:?} after the broker restarted",
        restarted.elapsed()
    );
    // And the service works end to end again.
    let newest = FeedWindow::at(SystemClock.now(), 0).newest;
    wait_saved_past(&broker.bootstrap, &names, newest, Duration::from_secs(180)).await;
    if pipelines == Pipelines::Both {
        publish(
            &broker.bootstrap,
            &rescan.requests,
            &[Req::json("k", valid("readyz-2"))],
        )
        .await;
        wait_results(
            &broker.bootstrap,
            &rescan.results,
            2,
            Duration::from_secs(180),
        )
        .await;
    }
    p.signal("-TERM");
    let status = p.wait(Duration::from_secs(60));
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_readyz_turns_unready_while_the_broker_is_down_and_ready_after_it_returns() {
    readyz_follows_the_broker(Pipelines::Both).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_readyz_turns_unready_while_the_broker_is_down_and_ready_after_it_returns() {
    readyz_follows_the_broker(Pipelines::FeedOnly).await;
}
