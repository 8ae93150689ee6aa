//! `GET /openapi.json`, generated from the handlers' annotations.

use utoipa::OpenApi;

use crate::error::ApiJson;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln",
        description = "Durable image-generation tasks: submit, follow, fetch."
    ),
    paths(
        crate::tasks::create,
        crate::batch::create,
        crate::tasks::list,
        crate::tasks::get_one,
        crate::tasks::cancel,
        crate::webhooks::api::task_messages,
        crate::webhooks::api::retry,
        crate::retry::retry,
        crate::events::stream,
        crate::previews::get_latest,
        crate::files::upload,
        crate::files::download,
        crate::files::delete,
        crate::workers::connect,
        crate::workers::list,
        crate::workers::drain,
        crate::workers::forget_identity,
        crate::workers::pause,
        crate::workers::resume,
        crate::overview::events,
        crate::overview::queue,
        crate::overview::throughput,
        crate::health::healthz,
        crate::health::readyz,
        crate::health::metrics,
        crate::openai::images::generations,
        crate::openai::images::edits,
        crate::openai::models::list,
        crate::openai::models::get_one,
    ),
    components(schemas(
        crate::tasks::CreateTask,
        crate::batch::CreateBatch,
        crate::batch::BatchAnswer,
        crate::batch::BatchItem,
        crate::batch::ItemError,
        crate::tasks::TaskView,
        crate::tasks::TaskPage,
        crate::files::FileObject,
        crate::overview::QueueView,
        crate::overview::DepthRow
    ))
)]
struct ApiDoc;

/// The OpenAPI document.
pub(crate) fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `GET /openapi.json`.
pub(crate) async fn serve() -> ApiJson<utoipa::openapi::OpenApi> {
    ApiJson(document())
}
