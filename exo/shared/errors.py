"""exo's errors. Each says what went wrong and what to do; the API maps them to OpenAI's error body.

    ExoError
    ├── InvalidRequest          the request cannot be served as asked (400)
    │   ├── ContextTooLong      prompt plus max_tokens exceed the model's context
    │   └── ChatTemplateError   the model's chat template rejected the conversation
    ├── ModelNotFound           no such model in the registry or on disk (404)
    ├── PlacementRefused        the cluster has too little memory (or too few nodes) for the model (409)
    ├── ServiceUnavailable      the node cannot take the request now (503, with Retry-After)
    │   └── Overloaded          the instance's queue is full
    └── ModelError              the model's files are missing, damaged or unsupported (500)
        ├── ModelFormatError
        └── ModelFetchError
"""


class ExoError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class InvalidRequest(ExoError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextTooLong(InvalidRequest):
    pass


class ChatTemplateError(InvalidRequest):
    pass


class ModelNotFound(ExoError):
    status_code = 404
    error_type = "not_found_error"


class PlacementRefused(ExoError):
    status_code = 409
    error_type = "placement_refused"


class ServiceUnavailable(ExoError):
    status_code = 503
    error_type = "service_unavailable"


class Overloaded(ServiceUnavailable):
    pass


class ModelError(ExoError):
    pass


class ModelFormatError(ModelError):
    pass


class ModelFetchError(ModelError):
    pass
