# The README's R example, run as written (so that it cannot rot).
readme_path <- function() {
  path <- Sys.getenv("CREW_README", "")
  if (!nzchar(path)) path <- file.path(testthat::test_path(), "..", "..", "..", "..", "README.md")
  path
}

readme_r_block <- function() {
  path <- readme_path()
  if (!file.exists(path)) {
    if (nzchar(Sys.getenv("CI"))) stop("README.md not found at ", path)
    testthat::skip(paste("README.md not found at", path))
  }
  lines <- readLines(path, warn = FALSE)
  start <- which(lines == "### R")[[1L]]
  open <- which(lines == "```r" & seq_along(lines) > start)[[1L]]
  close <- which(lines == "```" & seq_along(lines) > open)[[1L]]
  lines[(open + 1L):(close - 1L)]
}

test_that("the README's R example has five lines and runs", {
  skip_without_crew()
  code <- readme_r_block()
  expect_equal(length(grep("^library\\(", code, invert = TRUE)), 5L)
  root <- dirname(project_dir())
  old <- setwd(root)
  on.exit(setwd(old), add = TRUE)
  env <- new.env(parent = globalenv())
  on.exit(if (exists("controller", envir = env)) env$controller$terminate(), add = TRUE, after = FALSE)
  eval(parse(text = code), envir = env)
  results <- env$results
  expect_equal(nrow(results), 100L)
  expect_true(all(results$status == "success"))
  ord <- order(as.integer(sub("task-", "", results$name)))
  expect_equal(unlist(results$result[ord]), (1:100)^2)
})
