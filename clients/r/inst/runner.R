# What a crew worker runs for one R task pushed with push(command = ...):
# `Rscript runner.R` in the job's folder, where payload.rds was put (an
# input, staged by the daemon in the store). It evaluates the task and saves
# result.rds (a declared output, uploaded to the store): the result, or the
# error with its call, the warnings, and the seconds it took. Exits 1 when
# the task failed, so that the job's record says so too.
outcome <- local({
  warnings <- character(0)
  started <- proc.time()[["elapsed"]]
  seed <- NA_integer_
  out <- tryCatch(
    withCallingHandlers(
      {
        payload <- readRDS("payload.rds")
        .libPaths(unique(c(payload$library, .libPaths())))
        for (package in payload$packages) {
          library(package, character.only = TRUE)
        }
        if (length(payload$globals) > 0L) {
          list2env(payload$globals, envir = globalenv())
        }
        seed <- payload$seed
        if (is.null(seed)) {
          # The job's crew seed (a function of the crew seed and the task's
          # name): the same task draws the same numbers on every run.
          text <- Sys.getenv("CREW_SEED", "0")
          seed <- as.integer(substr(text, max(1L, nchar(text) - 8L), nchar(text)))
        }
        set.seed(seed)
        envir <- new.env(parent = globalenv())
        if (length(payload$data) > 0L) {
          list2env(payload$data, envir = envir)
        }
        list(result = eval(payload$command, envir = envir), error = NA_character_, trace = NA_character_)
      },
      warning = function(w) {
        warnings <<- c(warnings, conditionMessage(w))
        invokeRestart("muffleWarning")
      }
    ),
    error = function(e) {
      message <- conditionMessage(e)
      list(
        result = NA,
        error = if (nzchar(message)) message else ".",
        trace = paste(deparse(conditionCall(e)), collapse = "\n")
      )
    }
  )
  out$warnings <- if (length(warnings) > 0L) paste(warnings, collapse = ". ") else NA_character_
  out$seconds <- proc.time()[["elapsed"]] - started
  out$seed <- as.integer(seed)
  out
})
saved <- tryCatch(
  {
    saveRDS(outcome, "result.rds")
    TRUE
  },
  error = function(e) {
    outcome$result <- NA
    outcome$error <- paste("the result cannot be saved:", conditionMessage(e))
    saveRDS(outcome, "result.rds")
    FALSE
  }
)
quit(save = "no", status = if (saved && is.na(outcome$error)) 0L else 1L)
