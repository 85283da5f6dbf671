# R survey's own `api` raking examples (?rake), as independent-sampling designs, for
# tests/test_estimators.py. Usage: Rscript rake_api.R out_dir
# Writes out_dir/<case>.csv (x, y, w, api00, enroll) and prints "<case> <variable> <mean> <SE>".
suppressMessages(library(survey))
out <- commandArgs(trailingOnly = TRUE)[1]
data(api)
pop.types <- data.frame(stype = c("E", "H", "M"), Freq = c(4421, 755, 1018))
pop.schwide <- data.frame(sch.wide = c("No", "Yes"), Freq = c(1072, 5122))
pop.table <- xtabs(~stype + sch.wide, apipop)
pop.imp <- data.frame(comp.imp = c("No", "Yes"), Freq = c(1712, 4482))
ctrl <- list(maxit = 1000, epsilon = 1e-10)
for (sample_name in c("apiclus1", "apistrat")) {
  d <- get(sample_name)
  # Our estimator assumes independent draws: id = ~1, the design weights kept, no clusters or fpc.
  des <- svydesign(id = ~1, weights = ~pw, data = d)
  two <- rake(des, list(~stype, ~sch.wide), list(pop.types, pop.schwide), control = ctrl)
  joint <- rake(des, list(~stype + sch.wide, ~comp.imp), list(pop.table, pop.imp), control = ctrl)
  for (r in list(list("two", two, d$stype, d$sch.wide), list("joint", joint,
                 paste(d$stype, d$sch.wide, sep = ":"), d$comp.imp))) {
    case <- paste(sample_name, r[[1]], sep = "_")
    write.csv(data.frame(x = r[[3]], y = r[[4]], w = d$pw, api00 = d$api00, enroll = d$enroll),
              file.path(out, paste0(case, ".csv")), row.names = FALSE)
    m <- svymean(~api00 + enroll, r[[2]], na.rm = FALSE)
    for (v in c("api00", "enroll")) cat(sprintf("%s %s %.17g %.17g\n", case, v, coef(m)[v], SE(m)[v]))
  }
}
