# HTTP/1.1 + JSON over the daemon's Unix socket (docs/api.md), with curl.
#
# One handle per request: a Unix socket connects in microseconds, and a
# fresh handle never replays a request on a connection the daemon closed
# (a POST /v1/jobs sent twice would send the jobs twice). Another transport
# (the TCP listener with its bearer token) fits in crew_api_request() alone.

#' Send one request to a crew daemon.
#'
#' @param socket Path of the daemon's socket (`DIR/crew.sock`).
#' @param method `"GET"` or `"POST"`.
#' @param path The route, e.g. `"/v1/status"`.
#' @param body A list sent as JSON (POST), or `NULL`.
#' @param timeout Seconds before giving up; `0` waits as long as it takes.
#' @return The decoded JSON answer (a list). A refusal of the daemon is an
#'   error condition of class `crew_api_error` with fields `status`, `code`
#'   and `message` (the codes of docs/api.md); a daemon that cannot be
#'   reached is a `crew_daemon_error`.
#' @export
crew_api_request <- function(socket, method, path, body = NULL, timeout = 60) {
  handle <- curl::new_handle(unix_socket_path = socket)
  curl::handle_setopt(handle, customrequest = method, timeout = timeout)
  if (!is.null(body)) {
    json <- crew_json(body)
    curl::handle_setopt(handle, postfields = json)
    curl::handle_setheaders(handle, "Content-Type" = "application/json")
  }
  response <- tryCatch(
    curl::curl_fetch_memory(paste0("http://localhost", path), handle = handle),
    error = function(e) {
      crew_stop(
        sprintf("cannot talk to the crew daemon (socket %s): %s", socket, conditionMessage(e)),
        "crew_daemon_error"
      )
    }
  )
  text <- rawToChar(response$content)
  Encoding(text) <- "UTF-8"
  answer <- if (nzchar(text)) {
    tryCatch(jsonlite::fromJSON(text, simplifyVector = FALSE, bigint_as_char = TRUE), error = function(e) NULL)
  }
  if (response$status_code == 200L && !is.null(answer)) {
    return(answer)
  }
  error <- if (is.list(answer)) answer$error
  if (is.list(error)) {
    crew_api_stop(response$status_code, error$code, error$message)
  }
  crew_api_stop(
    response$status_code, "bad_response",
    sprintf("the daemon answered %d with %s", response$status_code, substr(text, 1L, 500L))
  )
}

# JSON of a request body: NULL fields left out, length-one vectors as
# scalars (wrap arrays in I()).
crew_json <- function(body) {
  body <- Filter(Negate(is.null), body)
  if (length(body) == 0L) {
    return("{}")
  }
  as.character(jsonlite::toJSON(body, auto_unbox = TRUE, null = "null", digits = NA))
}

crew_api_stop <- function(status, code, message) {
  condition <- structure(
    class = c("crew_api_error", "crew_error", "error", "condition"),
    list(
      message = sprintf("%s (%d): %s", code, as.integer(status), message),
      call = NULL,
      status = as.integer(status),
      code = code,
      detail = message
    )
  )
  stop(condition)
}

crew_stop <- function(message, class = "crew_error", ...) {
  condition <- structure(
    class = unique(c(class, "crew_error", "error", "condition")),
    list(message = message, call = NULL, ...)
  )
  stop(condition)
}
