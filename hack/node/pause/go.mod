module reactor.dev/hack/node/pause

go 1.22
