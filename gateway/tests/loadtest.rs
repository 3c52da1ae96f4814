//! The load tool works end to end (a small run; real runs are in docs/BENCHMARKS.md).

mod common;

use common::TestApp;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_fanout_and_latency_runs_report_every_delivery() {
    let app = TestApp::spawn(2).await;
    let urls: Vec<String> = (0..2)
        .flat_map(|g| {
            [
                "--url".to_owned(),
                format!("http://127.0.0.1:{}", app.port(g)),
            ]
        })
        .collect();
    let metrics: Vec<String> = app
        .gateways
        .iter()
        .flat_map(|g| {
            [
                "--metrics".to_owned(),
                format!("http://127.0.0.1:{}", g.admin_port),
            ]
        })
        .collect();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::procs::bin("loadtest"))
            .args(&urls)
            .args(&metrics)
            .args([
                "--jwt-secret",
                common::JWT_SECRET,
                "--mongodb-uri",
                &app.mongo.uri(),
                "--mongodb-db",
                &app.db,
            ])
            .args(args)
            .output()
            .expect("run loadtest");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).expect("one JSON object on stdout")
    };
    // The gateways run on this runtime's other worker meanwhile.
    let fanout = tokio::task::block_in_place(|| {
        run(&[
            "fanout",
            "--rooms",
            "2",
            "--members",
            "4",
            "--duration",
            "1",
        ])
    });
    assert!(fanout["acked"].as_u64().unwrap() > 0, "{fanout}");
    assert_eq!(
        fanout["deliveries"], fanout["expected_deliveries"],
        "{fanout}"
    );
    assert_eq!(fanout["duplicates"], 0);
    assert_eq!(fanout["out_of_order_or_gaps"], 0);
    assert!(
        fanout["server_counters"]["chat_gateway_deliveries_total"]
            .as_f64()
            .unwrap()
            >= fanout["deliveries"].as_f64().unwrap()
    );

    let latency = tokio::task::block_in_place(|| {
        run(&[
            "latency",
            "--rooms",
            "4",
            "--rate",
            "100",
            "--duration",
            "1",
            "--event",
            "typing",
        ])
    });
    assert_eq!(latency["sent"], latency["received"], "{latency}");
    assert!(latency["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
}
