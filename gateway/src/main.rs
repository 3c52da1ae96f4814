use clap::Parser;
use gateway::{Application, Settings};

// jemalloc rather than glibc's malloc: taking messages in allocates many short-lived buffers
// (frames, payloads, Redis commands), and glibc's malloc takes 15% of the profile of a
// gateway doing it, much of that consolidating and growing its arena again; with jemalloc
// the gateways use 7–15% less CPU per `message` delivery, for about 1 KB more per idle
// connection (docs/BENCHMARKS.md, "The allocator").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = Settings::parse();
    shared::admin::exit_if_healthcheck(settings.healthcheck, settings.metrics_port);
    shared::telemetry::init(settings.telemetry.log_format);
    shared::telemetry::exit_on_error(run(settings).await)
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(settings).await?;
    let shutdown = app.shutdown_token();
    tokio::spawn(async move {
        shared::telemetry::shutdown_signal().await;
        shutdown.cancel();
    });
    app.run_until_stopped().await
}
