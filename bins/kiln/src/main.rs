//! `kiln`: the server (`serve`), the reference demo worker (`worker --demo`) and config
//! tools. Reads as a script: parse arguments, load settings, start logging, run.

mod demo;
mod listen;
mod settings;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Durable image-generation task server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP API, the queue and (by default) the in-process demo worker.
    Serve {
        /// TOML config file; `KILN_*` variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a worker that connects to a kiln server over the kiln.v1 WebSocket protocol.
    Worker {
        /// Run the reference CPU worker (txt2img, img2img, delete_asset).
        #[arg(long)]
        demo: bool,
        /// The server's worker endpoint, e.g. ws://127.0.0.1:8080/v1/workers/connect.
        #[arg(long, default_value = "ws://127.0.0.1:8080/v1/workers/connect")]
        url: String,
        /// Worker token (also read from KILN_WORKER_TOKEN).
        #[arg(long, env = "KILN_WORKER_TOKEN")]
        token: Option<String>,
        /// Directory for the worker's id and result outbox.
        #[arg(long, default_value = "kiln-data/worker")]
        state_dir: PathBuf,
        /// Tasks run at once.
        #[arg(long, default_value_t = 2)]
        slots: u32,
        /// A model the worker serves (repeatable): tasks that name a model go only to
        /// workers listing it.
        #[arg(long = "model", default_value = "kiln-demo")]
        models: Vec<String>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the default configuration, every key documented.
    PrintDefault,
    /// Load and validate the configuration (file + environment), then exit.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the config entry of an API key (with `--scope`: `<scope>:sha256:<hex>`) or of a
    /// worker or metrics token (`sha256:<hex>`).
    HashKey {
        key: String,
        /// The API key's scope: read, submit or admin (without it: admin, and the form
        /// worker and metrics tokens take).
        #[arg(long)]
        scope: Option<kiln_gateway::Scope>,
    },
    /// Print a new webhook signing secret (`whsec_<base64>`) for `webhooks.secret`.
    GenWebhookSecret,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config { command } => config_command(command),
        Command::Serve { config } => {
            let settings = match settings::load(config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("kiln: {e}");
                    return ExitCode::from(settings::EX_CONFIG as u8);
                }
            };
            init_tracing(&settings.log);
            run(serve::serve(settings))
        }
        Command::Worker {
            demo,
            url,
            token,
            state_dir,
            slots,
            models,
        } => {
            init_tracing(&settings::Log {
                format: settings::LogFormat::Auto,
                filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            });
            if !demo {
                eprintln!(
                    "kiln: only the demo worker is built in (use --demo); GPU workers embed kiln-worker"
                );
                return ExitCode::from(2);
            }
            run(serve::demo_worker(url, token, state_dir, slots, models))
        }
    }
}

mod serve;

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(message = "kiln stopped", error = format!("{e:#}"));
            eprintln!("kiln: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_command(cmd: ConfigCommand) -> ExitCode {
    match cmd {
        ConfigCommand::PrintDefault => {
            print!("{}", settings::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        ConfigCommand::Check { config } => match settings::load(config.as_deref()) {
            Ok(s) => {
                println!(
                    "configuration ok: listening on {}, queue {}, files {}",
                    s.server.listen,
                    s.queue_desc(),
                    s.files_dir().display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kiln: {e}");
                ExitCode::from(settings::EX_CONFIG as u8)
            }
        },
        ConfigCommand::GenWebhookSecret => match kiln_webhooks::Secret::generate() {
            Ok(s) => {
                println!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kiln: cannot generate a secret: {e}");
                ExitCode::FAILURE
            }
        },
        ConfigCommand::HashKey { key, scope } => {
            match scope {
                Some(scope) => println!("{}", kiln_gateway::hash_key(&key, scope)),
                None => println!("{}", kiln_gateway::hash_secret(&key)),
            }
            ExitCode::SUCCESS
        }
    }
}

fn init_tracing(log: &settings::Log) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match log.format {
        settings::LogFormat::Json => true,
        settings::LogFormat::Pretty => false,
        settings::LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}
