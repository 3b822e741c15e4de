# A controller on a real daemon (`crew up`) in a fresh project folder,
# terminated (the daemon stopped) when the calling test ends. `crew` is
# $CREW_BIN, else crew on PATH (`cargo xtask clients` sets CREW_BIN).
have_crew <- function() {
  nzchar(Sys.getenv("CREW_BIN")) || nzchar(Sys.which("crew"))
}

skip_without_crew <- function() {
  if (!have_crew()) {
    if (nzchar(Sys.getenv("CI"))) stop("no crew binary: set CREW_BIN or put crew on PATH")
    testthat::skip("no crew binary: set CREW_BIN or put crew on PATH")
  }
}

project_dir <- function(envir = parent.frame()) {
  root <- tempfile("crew-r-")
  dir.create(root)
  withr::defer(unlink(root, recursive = TRUE), envir = envir)
  file.path(root, ".crew")
}

local_controller <- function(workers = 4L, ..., envir = parent.frame()) {
  skip_without_crew()
  controller <- crew_controller_daemon(workers = workers, dir = project_dir(envir), ...)
  withr::defer(controller$terminate(), envir = envir)
  controller$start()
  controller
}
