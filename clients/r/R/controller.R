# The controller: R crew's verbs backed by the crew daemon.
#
# A task is a crew job. push() sends one: a shell command (argv = or shell =),
# or an R expression (command =), which runs as `Rscript runner.R` on a
# worker with the task serialized into payload.rds, a job input that the
# daemon stages in its store; its result comes back as the job's output
# result.rds, read from the store. Outputs are received by id (POST
# /v1/receive with `ids`), so other clients of the same daemon keep theirs;
# received tasks wait in the controller until pop() or collect() hands them
# out, as in R crew.

#' Create a controller backed by the crew daemon.
#'
#' The drop-in for `crew::crew_controller_local()` and friends: the same
#' verbs (`start`, `push`, `pop`, `wait`, `collect`, `empty`, `saturated`,
#' `summary`, `terminate`), with the workers those of the project's crew
#' daemon, of any class it has (`local`, `aws-batch`, `ssh`, ...).
#'
#' @param name Name of the controller (the `controller` column of results).
#' @param workers Slots to recruit at `start()` (0: use the daemon's slots).
#' @param dir The project folder (`crew --dir`): default `$CREW_DIR`, else
#'   `.crew`.
#' @param class Worker class of the slots recruited.
#' @param tags Tags of the slots recruited, and of every job.
#' @param options Class options (`--opt`), a named list of strings.
#' @param seconds_idle,seconds_wall,tasks_max Limits of the slots recruited.
#' @param crew_bin The `crew` program: default `$CREW_BIN`, else `crew` on
#'   `PATH`.
#' @param rscript The `Rscript` the workers run for R tasks: default this R's
#'   own when `class` is `"local"`, else `"Rscript"`.
#' @return An R6 controller (`crew_class_controller_daemon`).
#' @export
crew_controller_daemon <- function(
  name = "crew",
  workers = 1L,
  dir = NULL,
  class = "local",
  tags = NULL,
  options = NULL,
  seconds_idle = NULL,
  seconds_wall = NULL,
  tasks_max = NULL,
  crew_bin = NULL,
  rscript = NULL
) {
  crew_class_controller_daemon$new(
    name = name, workers = workers, dir = dir, class = class, tags = tags, options = options,
    seconds_idle = seconds_idle, seconds_wall = seconds_wall, tasks_max = tasks_max,
    crew_bin = crew_bin, rscript = rscript
  )
}

#' R6 class of the daemon-backed controller.
#'
#' See [crew_controller_daemon()].
#' @export
crew_class_controller_daemon <- R6::R6Class(
  classname = "crew_class_controller_daemon",
  cloneable = FALSE,
  public = list(
    #' @field name Name of the controller.
    name = NULL,
    #' @field dir The project folder.
    dir = NULL,
    #' @field workers Slots recruited at start.
    workers = NULL,

    #' @description Use [crew_controller_daemon()].
    #' @param name,workers,dir,class,tags,options,seconds_idle,seconds_wall,tasks_max,crew_bin,rscript See [crew_controller_daemon()].
    initialize = function(name = "crew", workers = 1L, dir = NULL, class = "local", tags = NULL,
                          options = NULL, seconds_idle = NULL, seconds_wall = NULL, tasks_max = NULL,
                          crew_bin = NULL, rscript = NULL) {
      if (is.null(dir)) {
        dir <- Sys.getenv("CREW_DIR", "")
        if (!nzchar(dir)) dir <- ".crew"
      }
      self$name <- name
      self$dir <- normalizePath(dir, mustWork = FALSE)
      self$workers <- as.integer(workers)
      private$class <- class
      private$tags <- tags
      private$options <- options
      private$limits <- list(idle = seconds_idle, wall = seconds_wall, tasks_max = tasks_max)
      private$crew_bin <- crew_bin
      private$rscript <- if (!is.null(rscript)) {
        rscript
      } else if (identical(class, "local")) {
        file.path(R.home("bin"), "Rscript")
      } else {
        "Rscript"
      }
      private$socket <- file.path(self$dir, "crew.sock")
      private$unresolved_tasks <- new.env(parent = emptyenv())
      private$resolved_tasks <- list()
      private$log <- list()
    },

    #' @description Start the daemon if it is not running, and recruit the
    #'   controller's slots.
    #' @param controllers Not used (compatibility with controller groups).
    start = function(controllers = NULL) {
      if (private$started_flag) {
        return(invisible())
      }
      private$started_daemon <- !private$daemon_running()
      health <- jsonlite::fromJSON(private$run_crew(c("up", "--json")), simplifyVector = FALSE)
      private$store <- health$store
      if (self$workers > 0L) {
        body <- list(
          class = private$class,
          workers = self$workers,
          tags = if (!is.null(private$tags)) I(private$tags),
          idle = private$limits$idle,
          wall = private$limits$wall,
          tasks_max = private$limits$tasks_max,
          options = private$options
        )
        private$slots <- tryCatch(
          unlist(private$request("POST", "/v1/recruit", body)$slots),
          error = function(e) {
            # Leave nothing behind: a daemon started for nothing is stopped.
            if (private$started_daemon) private$down()
            stop(e)
          }
        )
      }
      private$started_flag <- TRUE
      invisible()
    },

    #' @description Whether the controller is started.
    started = function() {
      private$started_flag
    },

    #' @description Push a task: an R expression (`command`, run by `Rscript`
    #'   on a worker), or a program (`argv`, run directly) or a shell line
    #'   (`shell`).
    #' @param command An R expression (substituted unless `substitute = FALSE`).
    #' @param data Named list of objects the expression sees.
    #' @param globals Named list of objects assigned in the worker's global
    #'   environment.
    #' @param packages Packages attached on the worker before it runs.
    #' @param library Library paths for them (default: this session's).
    #' @param seed Random seed of the task (default: the job's crew seed).
    #' @param name Task name (unique among tasks not yet popped).
    #' @param substitute Whether to substitute `command`.
    #' @param seconds_timeout The job's timeout.
    #' @param argv A program and its arguments (a character vector).
    #' @param shell A line for `/bin/sh -c`.
    #' @param tags Tags of the job (default: the controller's).
    #' @param ... Further job-line keys (`retries`, `env`, `memory`,
    #'   `inputs`, `outputs`, ...); arguments of R crew's `push()` that
    #'   have no meaning here (`scale`, `throttle`, `algorithm`,
    #'   `save_command`, `controller`) are accepted and ignored.
    #' @return The task's job id and name, invisibly.
    push = function(command = NULL, data = list(), globals = list(), packages = character(0),
                    library = NULL, seed = NULL, name = NULL, substitute = TRUE, seconds_timeout = NULL,
                    argv = NULL, shell = NULL, tags = NULL, ...) {
      if (substitute) {
        command <- substitute(command)
        # push(command = quote(f(x))) means f(x), as in targets' own calls.
        if (is.call(command) && identical(command[[1L]], as.name("quote")) && length(command) == 2L) {
          command <- command[[2L]]
        }
      }
      self$start()
      job <- Filter(Negate(is.null), c(list(name = name), private$job_extra(list(...), tags, seconds_timeout)))
      if (!is.null(argv) || !is.null(shell)) {
        if (!is.null(argv)) {
          job$command <- I(as.character(argv))
          text <- paste(argv, collapse = " ")
        } else {
          job$shell <- shell
          text <- shell
        }
        id <- private$send(job)
        private$track(id, name, text, "shell")
      } else {
        if (is.null(command)) {
          crew_stop("push() needs a command (an R expression), argv = or shell =")
        }
        payload <- private$payload(command, data, globals, packages, library, seed)
        on.exit(unlink(payload), add = TRUE)
        job <- private$r_job(job, payload)
        id <- private$send(job)
        private$track(id, name, paste(deparse(command), collapse = "\n"), "r")
      }
      invisible(list(id = id, name = name))
    },

    #' @description Run an R expression over the elements of `iterate` and
    #'   wait for every result (R crew's `map()`): one request sends every
    #'   task; the outputs are received by their ids and do not go through
    #'   `pop()`.
    #' @param command An R expression (substituted unless `substitute = FALSE`).
    #' @param iterate Named list of vectors of equal length: task `i` sees
    #'   element `i` of each under its name.
    #' @param data,globals,packages,library,seed As in `push()` (with `seed`,
    #'   task `i` uses `seed + i - 1`).
    #' @param names Name of an element of `iterate` holding the task names.
    #' @param substitute Whether to substitute `command`.
    #' @param seconds_timeout The jobs' timeout.
    #' @param error `"stop"` (default), `"warn"` or `"silent"` about failed tasks.
    #' @param ... Further job-line keys, as in `push()`; R crew's arguments
    #'   without meaning here are ignored.
    #' @return A data frame, one row per task, in the order of `iterate`.
    map = function(command, iterate, data = list(), globals = list(), packages = character(0), library = NULL,
                   seed = NULL, names = NULL, substitute = TRUE, seconds_timeout = NULL, error = "stop", ...) {
      if (substitute) command <- substitute(command)
      error <- match.arg(error, c("stop", "warn", "silent"))
      self$start()
      n <- unique(lengths(iterate))
      if (length(n) != 1L) crew_stop("map(): the elements of iterate must have the same length")
      if (n == 0L) return(NULL)
      task_names <- if (is.null(names)) rep(NA_character_, n) else as.character(iterate[[names]])
      extra <- private$job_extra(list(...), NULL, seconds_timeout)
      payloads <- character(n)
      on.exit(unlink(payloads), add = TRUE)
      jobs <- vector("list", n)
      for (i in seq_len(n)) {
        element <- lapply(iterate, function(x) x[[i]])
        payloads[[i]] <- private$payload(command, c(element, data), globals, packages, library,
                                         if (is.null(seed)) NULL else seed + i - 1L)
        jobs[[i]] <- private$r_job(extra, payloads[[i]])
      }
      ids <- as.integer(unlist(private$request("POST", "/v1/jobs", list(jobs = jobs))$ids))
      text <- paste(deparse(command), collapse = "\n")
      tasks <- lapply(seq_len(n), function(i) list(name = task_names[[i]], command = text, kind = "r"))
      rows <- vector("list", n)
      while (any(vapply(rows, is.null, TRUE))) {
        waiting <- ids[vapply(rows, is.null, TRUE)]
        answer <- private$request("POST", "/v1/receive", list(ids = I(waiting), wait = TRUE, timeout = 5), timeout = 65)
        for (output in answer$outputs) {
          i <- match(as.integer(output$id), ids)
          rows[[i]] <- private$row(tasks[[i]], output)
        }
      }
      private$hand_out(rows, if (identical(error, "silent")) NULL else error)
    },

    #' @description One finished task as a one-row data frame, or `NULL`.
    #' @param scale,throttle,controllers Not used.
    #' @param collect Not used.
    #' @param error `NULL` (keep errors in the result), `"stop"` (signal the
    #'   task's error) or `"warn"`.
    pop = function(scale = TRUE, collect = NULL, throttle = TRUE, error = NULL, controllers = NULL) {
      if (length(private$resolved_tasks) == 0L) {
        private$receive(wait = FALSE)
      }
      if (length(private$resolved_tasks) == 0L) {
        return(NULL)
      }
      row <- private$resolved_tasks[[1L]]
      private$resolved_tasks <- private$resolved_tasks[-1L]
      private$hand_out(list(row), error)
    },

    #' @description Wait for tasks: all of them (`mode = "all"`) or one.
    #' @param mode `"all"` or `"one"`.
    #' @param seconds_interval Not used: waiting is a long poll of the daemon.
    #' @param seconds_timeout Give up after this long.
    #' @param scale,throttle,controllers Not used.
    #' @return `TRUE` when the condition was met, `FALSE` on timeout (invisibly).
    wait = function(mode = "all", seconds_interval = NULL, seconds_timeout = Inf, scale = TRUE,
                    throttle = TRUE, controllers = NULL) {
      mode <- match.arg(mode, c("all", "one"))
      deadline <- Sys.time() + min(seconds_timeout, 1e8)
      repeat {
        left <- length(ls(private$unresolved_tasks))
        if (left == 0L || (mode == "one" && length(private$resolved_tasks) > 0L)) {
          return(invisible(TRUE))
        }
        remaining <- as.numeric(difftime(deadline, Sys.time(), units = "secs"))
        if (remaining <= 0) {
          return(invisible(FALSE))
        }
        private$receive(wait = TRUE, timeout = min(remaining, 5))
      }
    },

    #' @description Every finished task as a data frame (one row each), or
    #'   `NULL` when none is finished.
    #' @param scale,throttle,controllers Not used.
    #' @param error As in `pop()`.
    collect = function(scale = TRUE, throttle = TRUE, error = NULL, controllers = NULL) {
      private$receive(wait = FALSE)
      if (length(private$resolved_tasks) == 0L) {
        return(NULL)
      }
      rows <- private$resolved_tasks
      private$resolved_tasks <- list()
      private$hand_out(rows, error)
    },

    #' @description Whether no task is running or waiting to be popped.
    #' @param controllers Not used.
    empty = function(controllers = NULL) {
      length(ls(private$unresolved_tasks)) == 0L && length(private$resolved_tasks) == 0L
    },

    #' @description Whether some task is running or waiting to be popped.
    #' @param controllers Not used.
    nonempty = function(controllers = NULL) {
      !self$empty()
    },

    #' @description Number of tasks pushed and not yet finished (here: not yet received).
    #' @param controllers Not used.
    unresolved = function(controllers = NULL) {
      length(ls(private$unresolved_tasks))
    },

    #' @description Number of finished tasks not yet popped.
    #' @param controllers Not used.
    unpopped = function(controllers = NULL) {
      private$receive(wait = FALSE)
      length(private$resolved_tasks)
    },

    #' @description Whether the unfinished tasks fill every usable slot.
    #' @param collect,throttle,controller Not used.
    saturated = function(collect = NULL, throttle = NULL, controller = NULL) {
      slots <- private$usable_slots()
      length(ls(private$unresolved_tasks)) >= length(slots)
    },

    #' @description One row per slot of the daemon: its class, state, the
    #'   tasks of this controller it ran (popped), their seconds, errors and
    #'   warnings, and the jobs it ran in all.
    #' @param controllers Not used.
    summary = function(controllers = NULL) {
      self$start()
      slots <- private$request("GET", "/v1/status")$slots
      if (length(slots) == 0L) {
        return(NULL)
      }
      worker <- vapply(slots, function(s) s$name, "")
      mine <- function(slot, f) {
        rows <- Filter(function(r) identical(r$worker, slot), private$log)
        f(rows)
      }
      data.frame(
        controller = rep(self$name, length(slots)),
        worker = worker,
        class = vapply(slots, function(s) s$class, ""),
        state = vapply(slots, function(s) s$state, ""),
        tasks = vapply(worker, function(w) mine(w, length), 0L, USE.NAMES = FALSE),
        seconds = vapply(worker, function(w) mine(w, function(r) sum(vapply(r, function(x) x$seconds %||% 0, 0))), 0,
                         USE.NAMES = FALSE),
        errors = vapply(worker, function(w) mine(w, function(r) sum(vapply(r, function(x) x$status != "success", TRUE))),
                        0L, USE.NAMES = FALSE),
        warnings = vapply(worker, function(w) mine(w, function(r) sum(vapply(r, function(x) !is.na(x$warnings), TRUE))),
                          0L, USE.NAMES = FALSE),
        jobs_done = vapply(slots, function(s) as.integer(s$jobs_done), 0L),
        stringsAsFactors = FALSE
      )
    },

    #' @description Cancel unfinished tasks: by name, or all of them.
    #'   Each still ends, with status `"cancel"`, to be popped.
    #' @param names Names of tasks to cancel.
    #' @param all Whether to cancel every unfinished task.
    cancel = function(names = character(0), all = FALSE) {
      ids <- ls(private$unresolved_tasks)
      if (!all) {
        ids <- Filter(function(id) isTRUE(private$unresolved_tasks[[id]]$name %in% names), ids)
      }
      if (length(ids) == 0L || !private$started_flag) {
        return(invisible(integer(0)))
      }
      answer <- private$request("POST", "/v1/cancel", list(ids = I(as.integer(ids))))
      invisible(as.integer(unlist(answer$cancelled)))
    },

    #' @description Start down slots now (`n` of them).
    #' @param n Number of workers to launch.
    #' @param controllers Not used.
    launch = function(n = 1L, controllers = NULL) {
      self$start()
      body <- list(workers = as.integer(n), tags = if (!is.null(private$tags)) I(private$tags))
      invisible(private$request("POST", "/v1/launch", body)$launched)
    },

    #' @description Nothing to do: the daemon starts slots when jobs need them.
    #' @param throttle,controllers Not used.
    scale = function(throttle = TRUE, controllers = NULL) {
      invisible()
    },

    #' @description The whole stdout and stderr of a finished task (by name or job id).
    #' @param task A task name or a job id.
    logs = function(task) {
      id <- private$job_id(task)
      answer <- private$request("GET", sprintf("/v1/jobs/%d/logs", id))
      list(stdout = answer$stdout, stderr = answer$stderr)
    },

    #' @description Download a finished task's output files (declared with
    #'   `outputs =` in `push()`) from the store, checked (`crew fetch`).
    #' @param task A task name or a job id.
    #' @param to The folder to put them in.
    #' @return The paths of the files, invisibly.
    fetch = function(task, to = ".") {
      id <- private$job_id(task)
      out <- private$run_crew(c("fetch", as.character(id), "--to", shQuote(normalizePath(to, mustWork = FALSE)),
                                "--json"))
      lines <- strsplit(out, "\n", fixed = TRUE)[[1L]]
      lines <- lines[nzchar(lines)]
      invisible(vapply(lines, function(line) jsonlite::fromJSON(line)$path, "", USE.NAMES = FALSE))
    },

    #' @description Stop: cancel the unfinished tasks, and stop the daemon if
    #'   `start()` started it (else dismiss the slots it recruited).
    #' @param controllers Not used.
    terminate = function(controllers = NULL) {
      if (!private$started_flag) {
        return(invisible())
      }
      try(self$cancel(all = TRUE), silent = TRUE)
      if (private$started_daemon) {
        private$down()
      } else {
        for (slot in private$slots) {
          try(private$request("POST", "/v1/dismiss", list(slot = slot)), silent = TRUE)
        }
      }
      private$started_flag <- FALSE
      private$slots <- NULL
      invisible()
    }
  ),
  private = list(
    class = NULL,
    tags = NULL,
    options = NULL,
    limits = NULL,
    crew_bin = NULL,
    rscript = NULL,
    socket = NULL,
    store = NULL,
    slots = NULL,
    started_flag = FALSE,
    started_daemon = FALSE,
    unresolved_tasks = NULL,
    resolved_tasks = NULL,
    log = NULL,
    ids_by_name = list(),

    request = function(method, path, body = NULL, timeout = 60) {
      crew_api_request(private$socket, method, path, body, timeout)
    },

    crew_program = function() {
      program <- private$crew_bin %||% Sys.getenv("CREW_BIN", "")
      if (!nzchar(program)) program <- Sys.which("crew")
      if (!nzchar(program)) {
        crew_stop("cannot find crew: put it on PATH or set CREW_BIN to its path", "crew_daemon_error")
      }
      program
    },

    run_crew = function(args) {
      err <- tempfile()
      on.exit(unlink(err))
      out <- suppressWarnings(system2(private$crew_program(), c("--dir", shQuote(self$dir), args),
                                      stdout = TRUE, stderr = err, stdin = ""))
      status <- attr(out, "status") %||% 0L
      if (status != 0L) {
        crew_stop(
          sprintf("`crew %s` failed (exit %d): %s", paste(args, collapse = " "), status,
                  paste(readLines(err, warn = FALSE), collapse = "\n")),
          "crew_daemon_error"
        )
      }
      paste(out, collapse = "\n")
    },

    daemon_running = function() {
      file.exists(private$socket) &&
        !inherits(try(private$request("GET", "/v1/health", timeout = 5), silent = TRUE), "try-error")
    },

    # Stops the daemon and waits until it is gone.
    down = function() {
      pid <- tryCatch(private$request("GET", "/v1/health")$pid, error = function(e) NULL)
      try(private$request("POST", "/v1/down", list()), silent = TRUE)
      if (!is.null(pid)) private$wait_gone(as.integer(pid))
    },

    wait_gone = function(pid) {
      for (i in seq_len(600L)) {
        stat <- suppressWarnings(tryCatch(readLines(sprintf("/proc/%d/stat", pid), warn = FALSE),
                                          error = function(e) character(0)))
        if (length(stat) == 0L || grepl("^[0-9]+ \\(.*\\) Z", stat[[1L]])) {
          return(invisible(TRUE))
        }
        Sys.sleep(0.05)
      }
      invisible(FALSE)
    },

    # The job-line keys of a push: `...` without R crew's arguments that
    # mean nothing here, the tags, the timeout; arrays kept arrays.
    job_extra = function(extra, tags, seconds_timeout) {
      extra <- extra[setdiff(names(extra), c("scale", "throttle", "algorithm", "save_command", "controller",
                                            "seconds_interval", "warnings", "verbose"))]
      tags <- tags %||% private$tags
      job <- c(list(tags = if (!is.null(tags)) I(tags), timeout = seconds_timeout), extra)
      for (key in c("env_inherit", "outputs", "inputs")) {
        if (!is.null(job[[key]])) job[[key]] <- I(job[[key]])
      }
      Filter(Negate(is.null), job)
    },

    # Saves an R task into a payload file of the project folder; its path
    # (the daemon stages it in the store when the job is sent: delete it then).
    payload = function(command, data, globals, packages, library, seed) {
      folder <- file.path(self$dir, "crewclient")
      dir.create(folder, showWarnings = FALSE, recursive = TRUE, mode = "0700")
      path <- tempfile("payload-", tmpdir = folder, fileext = ".rds")
      saveRDS(
        list(
          command = command, data = data, globals = globals, packages = packages,
          library = library %||% .libPaths(), seed = seed
        ),
        path
      )
      normalizePath(path)
    },

    # The job of an R task: `Rscript runner.R` with the payload and the
    # runner as inputs and result.rds as an output.
    r_job = function(job, payload) {
      runner <- system.file("runner.R", package = "crewclient", mustWork = TRUE)
      job$command <- I(c(private$rscript, "runner.R"))
      job$inputs <- I(c(
        as.list(job$inputs),
        list(list(path = payload, name = "payload.rds"), list(path = normalizePath(runner), name = "runner.R"))
      ))
      job$outputs <- I(c(as.character(job$outputs), "result.rds"))
      job
    },

    send = function(job) {
      answer <- private$request("POST", "/v1/jobs", list(jobs = list(job)))
      as.integer(answer$ids[[1L]])
    },

    track = function(id, name, text, kind) {
      assign(as.character(id), list(name = name, command = text, kind = kind), envir = private$unresolved_tasks)
      if (!is.null(name)) private$ids_by_name[[name]] <- id
    },

    job_id = function(task) {
      if (is.numeric(task)) {
        return(as.integer(task))
      }
      id <- private$ids_by_name[[task]]
      if (is.null(id)) crew_stop(sprintf("no task named %s", task))
      id
    },

    usable_slots = function() {
      self$start()
      slots <- private$request("GET", "/v1/status")$slots
      Filter(function(s) !identical(s$state, "broken"), slots)
    },

    # Receive what is ready of this controller's jobs (with `wait`: at least
    # one, or until `timeout` seconds), into the resolved queue.
    receive = function(wait = FALSE, timeout = NULL) {
      ids <- as.integer(ls(private$unresolved_tasks))
      if (length(ids) == 0L || !private$started_flag) {
        return(invisible())
      }
      body <- list(ids = I(ids), wait = wait, timeout = timeout)
      answer <- private$request("POST", "/v1/receive", body, timeout = if (wait) (timeout %||% 0) + 60 else 60)
      for (output in answer$outputs) {
        key <- as.character(output$id)
        task <- private$unresolved_tasks[[key]]
        if (is.null(task)) next
        rm(list = key, envir = private$unresolved_tasks)
        private$resolved_tasks[[length(private$resolved_tasks) + 1L]] <- private$row(task, output)
      }
      invisible()
    },

    # One result row (a list) from a task and its output record.
    row = function(task, output) {
      status <- switch(output$status,
        succeeded = "success",
        cancelled = "cancel",
        crashed = "crash",
        launch_failed = "crash",
        "error"
      )
      error <- if (is.null(output$error)) NA_character_ else output$error
      row <- list(
        name = task$name %||% NA_character_,
        command = task$command,
        result = NA,
        status = status,
        error = error,
        code = if (is.null(output$exit_code)) NA_integer_ else as.integer(output$exit_code),
        trace = NA_character_,
        warnings = NA_character_,
        seconds = if (is.null(output$wall_seconds)) NA_real_ else as.numeric(output$wall_seconds),
        seed = NA_integer_,
        algorithm = NA_character_,
        controller = self$name,
        worker = output$slot %||% NA_character_,
        id = as.integer(output$id),
        job_status = output$status
      )
      if (task$kind == "shell") {
        row$result <- output$stdout$text
        return(row)
      }
      object <- Filter(function(o) identical(o$name, "result.rds"), output$objects %||% list())
      if (length(object) == 0L) {
        return(row)
      }
      outcome <- tryCatch(readRDS(private$read_object(output$id, object[[1L]])), error = function(e) NULL)
      if (is.null(outcome)) {
        row$error <- "the task's result.rds could not be read"
        row$status <- "error"
        return(row)
      }
      row$result <- outcome$result
      if (!is.na(outcome$error)) {
        row$status <- "error"
        row$error <- outcome$error
        row$trace <- outcome$trace
      } else if (status == "error") {
        row$error <- error
      } else {
        row$error <- NA_character_
      }
      row$warnings <- outcome$warnings
      row$seconds <- outcome$seconds
      row$seed <- outcome$seed
      row
    },

    # A local path to a job's output object: the file itself in a local
    # folder store, else a copy fetched by `crew fetch`.
    read_object = function(id, object) {
      store <- private$store
      if (startsWith(store, "file://")) {
        root <- utils::URLdecode(sub("^file://(localhost)?", "", store))
        path <- file.path(root, object$key)
        if (file.exists(path)) return(path)
      }
      to <- tempfile("crew-fetch-")
      private$run_crew(c("fetch", as.character(id), "--to", shQuote(to)))
      file.path(to, object$name)
    },

    # Rows (lists) to a data frame with a list column `result`, logged for
    # summary(); `error = "stop"` signals the first failed task's error.
    hand_out = function(rows, error) {
      private$log <- c(private$log, rows)
      column <- function(name, type) vapply(rows, function(r) r[[name]] %||% type[NA_integer_], type)
      frame <- data.frame(
        name = column("name", NA_character_),
        command = column("command", ""),
        stringsAsFactors = FALSE
      )
      frame$result <- lapply(rows, function(r) r$result)
      frame$status <- column("status", "")
      frame$error <- column("error", NA_character_)
      frame$code <- column("code", NA_integer_)
      frame$trace <- column("trace", NA_character_)
      frame$warnings <- column("warnings", NA_character_)
      frame$seconds <- column("seconds", NA_real_)
      frame$seed <- column("seed", NA_integer_)
      frame$algorithm <- column("algorithm", NA_character_)
      frame$controller <- column("controller", "")
      frame$worker <- column("worker", NA_character_)
      frame$id <- column("id", NA_integer_)
      frame$job_status <- column("job_status", "")
      if (!is.null(error)) {
        failed <- which(frame$status != "success")
        if (length(failed) > 0L) {
          first <- failed[[1L]]
          text <- sprintf("task %s (job %d) %s: %s", frame$name[[first]], frame$id[[first]],
                          frame$status[[first]], frame$error[[first]])
          if (identical(error, "stop")) crew_stop(text, "crew_task_error")
          if (identical(error, "warn")) warning(text, call. = FALSE)
        }
      }
      frame
    }
  )
)

`%||%` <- function(x, y) if (is.null(x)) y else x
