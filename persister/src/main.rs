use clap::Parser;
use persister::{Application, Settings};

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
