//! kiln-upload in action against a tiny image host started on 127.0.0.1 by this example:
//! a fallback chain whose first target answers like a gateway timing out (HTML 524) and
//! whose second is a multipart form upload returning JSON.
//!
//! Run from the workspace root: `cargo run --example upload`

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kiln_upload::{
    Fallback, Multipart, PresignedPut, UploadClient, UploadConfig, UploadCounters, UploadFile,
    UploadTarget,
};

/// `/r2/...` fails like a Cloudflare 524; `/imgbb` reads the form and answers with a URL.
async fn host(req: http::Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (status, ct, text) = if path.starts_with("/r2/") {
        (
            524,
            "text/html",
            "<html><body><h1>Error 524</h1>A timeout occurred</body></html>".to_owned(),
        )
    } else {
        let json = format!(
            r#"{{"data":{{"id":"a1","url":"https://i.example/a1.png","size":{}}},"success":true}}"#,
            body.len()
        );
        (200, "application/json", json)
    };
    let mut res = http::Response::new(Full::new(Bytes::from(text)));
    *res.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ct),
    );
    Ok(res)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter("kiln_upload=info")
        .init();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(host)),
            );
        }
    });

    let counters = Arc::new(UploadCounters::default());
    let client = UploadClient::with_metrics(UploadConfig::default(), counters.clone())?;
    let chain = Fallback::new(vec![
        Box::new(PresignedPut::new(
            format!("http://{addr}/r2/refs/cat.png").parse()?,
        )) as Box<dyn UploadTarget>,
        Box::new(Multipart::new(
            format!("http://{addr}/imgbb?key=demo").parse()?,
        )),
    ]);
    let image: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let file = UploadFile::new(image, "cat.png", "image/png").with_progress(|sent, total| {
        if sent == total {
            eprintln!("progress: {sent}/{total} bytes");
        }
    });

    let result = client.upload(&chain, &file).await?;
    println!(
        "stored by {} at {:?} (id {:?})",
        result.target, result.url, result.id
    );
    for (target, error) in &result.failures {
        println!("  earlier failure, {target}: {error}");
    }
    println!(
        "attempts {}, reused connection {}, first byte {:?}, total {:?}",
        result.attempts, result.reused_connection, result.timings.first_byte, result.timings.total
    );
    println!("counters: {:?}", counters.snapshot());
    Ok(())
}
