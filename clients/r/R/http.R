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

# The event stream (GET /v1/events, server-sent events) ------------------
#
# R's curl streams a response through a connection (curl::curl() with the
# handle's unix_socket_path): libcurl undoes the chunked encoding and
# readLines() blocks until the daemon writes a line, so a blocked R waits in
# the kernel, not in a loop. R has no threads and a blocking read cannot be
# given a deadline of its own, so a stream is opened for a window: the
# handle's `timeout` ends it (readLines then signals an error, read as
# "the window passed"), and a caller that must wait longer opens another
# (subscribing again, then reading the state: nothing is missed).

# Opens the stream for `seconds`; returns once subscribed (": subscribed" read).
crew_events_open <- function(socket, seconds) {
  handle <- curl::new_handle(unix_socket_path = socket)
  curl::handle_setopt(handle, timeout_ms = max(1L, as.integer(ceiling(seconds * 1000))))
  curl::handle_setheaders(handle, Accept = "text/event-stream")
  con <- curl::curl("http://localhost/v1/events", handle = handle)
  opened <- tryCatch(
    {
      open(con, "rb", blocking = TRUE)
      TRUE
    },
    error = function(e) e
  )
  if (!isTRUE(opened)) {
    try(close(con), silent = TRUE)
    crew_stop(
      sprintf("cannot subscribe to the crew daemon's events (socket %s): %s", socket, conditionMessage(opened)),
      "crew_daemon_error"
    )
  }
  first <- tryCatch(readLines(con, n = 1L, warn = FALSE), error = function(e) character(0))
  if (length(first) == 0L || !startsWith(first, ":")) {
    # Not an event stream: an error answer (503 while stopping), or nothing.
    try(close(con), silent = TRUE)
    crew_stop(sprintf("the crew daemon (socket %s) did not open its event stream", socket), "crew_daemon_error")
  }
  con
}

# The next event of an open stream as a list (its `data` object, with
# `type`); NULL when the window passed; a `crew_stream_ended` condition
# when the daemon closed the stream (it stopped).
crew_events_next <- function(con) {
  type <- NULL
  data <- character(0)
  repeat {
    line <- tryCatch(readLines(con, n = 1L, warn = FALSE), error = function(e) NULL)
    if (is.null(line)) {
      return(NULL)
    }
    if (length(line) == 0L) {
      crew_stop("the crew daemon closed its event stream", c("crew_stream_ended", "crew_daemon_error"))
    }
    line <- sub("\r$", "", line)
    if (!nzchar(line)) {
      if (length(data) == 0L && is.null(type)) next
      event <- tryCatch(
        jsonlite::fromJSON(paste(data, collapse = "\n"), simplifyVector = FALSE, bigint_as_char = TRUE),
        error = function(e) list()
      )
      if (!is.list(event)) event <- list(data = event)
      event$type <- type %||% event$type %||% "message"
      return(event)
    }
    if (startsWith(line, ":")) next # a comment: ": keepalive"
    field <- sub(":.*$", "", line)
    value <- if (grepl(":", line, fixed = TRUE)) sub("^[^:]*: ?", "", line) else ""
    if (field == "event") type <- value
    if (field == "data") data <- c(data, value)
  }
}

#' Read the crew daemon's live events.
#'
#' Subscribes to `GET /v1/events` (server-sent events, docs/api.md) and
#' returns the events that happen within `seconds_timeout` (or the first
#' `n` of them): `jobs_sent` (`ids`), `job_assigned` (`id`, `slot`,
#' `attempt`), `job_ended` (`id`, `name`, `status`, `slot`, `attempt`),
#' `slot_up`, `slot_down`, `slot_crashed` (`slot`, `class`, `reason`) and
#' `lagged` (`missed`: this client fell behind; read the state again).
#' Keepalive comments are skipped. `after`, when given, is called once
#' subscribed (before any event is read): send jobs there to see all of
#' their events. `until`, when given, is called on each event; the events
#' are returned after the first for which it is `TRUE`.
#'
#' @param socket Path of the daemon's socket (`DIR/crew.sock`).
#' @param seconds_timeout How long to listen.
#' @param n Return after this many events.
#' @param after A function of no arguments called once subscribed, or `NULL`.
#' @param until A function of one event returning `TRUE` to stop, or `NULL`.
#' @return A list of events, each a list with `type` and its fields. The
#'   list ends early when the daemon stops.
#' @export
crew_events <- function(socket, seconds_timeout = 10, n = Inf, after = NULL, until = NULL) {
  con <- crew_events_open(socket, seconds_timeout)
  on.exit(try(close(con), silent = TRUE), add = TRUE)
  if (is.function(after)) after()
  events <- list()
  while (length(events) < n) {
    event <- tryCatch(crew_events_next(con), crew_stream_ended = function(e) FALSE)
    if (is.null(event) || isFALSE(event)) break
    events[[length(events) + 1L]] <- event
    if (is.function(until) && isTRUE(until(event))) break
  }
  events
}
